"""Stochastic depth drawn once per forward (``StochasticDepth``) for the encoders' blocks."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from affmae import create_model
from affmae.layers.block import AFFBlock
from affmae.layers.common import DropPath, StochasticDepth
from affmae.ops.masking import make_mask


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).split(".")[-1]] += 1
        return func(*args, **(kwargs or {}))


def test_factors_are_each_rows_drop_path_outcomes():
    rates = [0.0, 0.2, 0.5]
    f = StochasticDepth(rates).train().draw(20000, torch.device("cpu"))
    assert f.shape == (3, 2, 20000) and f.dtype == torch.float32
    for i, r in enumerate(rates):
        scale = DropPath(r)._scale
        assert set(f[i].unique().tolist()) <= {0.0, scale}
        dropped = (f[i] == 0).float().mean().item()
        assert abs(dropped - r) < 0.015, (r, dropped)  # 20000 x 2 draws: sd <= 0.0025


def test_no_draw_in_evaluation_or_without_rates():
    assert StochasticDepth([0.1, 0.2]).eval().draw(4, torch.device("cpu")) is None
    assert StochasticDepth([0.0, 0.0]).train().draw(4, torch.device("cpu")) is None


@pytest.mark.parametrize("name", ["aff_tiny", "vit_tiny"])
def test_one_uniform_draw_per_training_forward(name):
    """Every block's drop path comes from one ``rand``: before, each branch drew its own."""
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.2).train()
    imgs = torch.randn(2, 1, 64, 64)
    mask = make_mask(2, (8, 8), 0.5, "perlin", generator=torch.Generator().manual_seed(0))
    with _Ops() as ops:
        model(imgs, mask)
    assert ops.ops["rand"] == 1, ops.ops["rand"]
    model.eval()
    with torch.no_grad(), _Ops() as ops:
        model(imgs, mask)
    assert ops.ops["rand"] == 0


def test_block_applies_the_given_factors_as_its_own_draw():
    """A block given factors computes what it computes when its DropPath draws them."""
    torch.manual_seed(0)
    from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens
    from affmae.ops.patches import grid_positions

    blk = AFFBlock(32, 2, 2.0, drop_path=0.4).train()
    B, gh, gw = 3, 6, 6
    idx = torch.stack([torch.randperm(gh * gw)[:20] for _ in range(B)])
    pos = grid_positions(idx, gw)
    cl = balanced_clustering(pos, (gh, gw), 4, 3)
    pos = pad_tokens(gather_tokens(pos, cl.perm), cl.n_padded)
    x = torch.randn(B, pos.shape[1], 32)
    given = torch.tensor([[0.0, blk.drop_path._scale, blk.drop_path._scale],
                          [blk.drop_path._scale, 0.0, blk.drop_path._scale]])
    got = blk(x, pos, cl, given)
    rows = iter(given)
    blk.drop_path.factors = lambda t, g=None: next(rows)  # the block's own draws, forced
    want = blk(x, pos, cl)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_draws_in_cuda_graph_replays():
    """With its tables on the device (any eager forward puts them there), a captured draw gives
    fresh factors on every replay; a first draw inside a capture returns None (the blocks then
    draw for themselves) instead of a host-to-device copy that capture forbids."""
    dev = torch.device("cuda")
    cold = StochasticDepth([0.1, 0.3]).train()
    warm = StochasticDepth([0.1, 0.3]).train()
    warm.draw(64, dev)  # eager: the tables go to the device
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        none = cold.draw(64, dev)
        f = warm.draw(64, dev)
    assert none is None
    outs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(f.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    for i, r in enumerate([0.1, 0.3]):
        assert set(torch.cat([o[i].flatten() for o in outs]).unique().tolist()) <= {
            0.0, DropPath(r)._scale}
