"""Whole-step CUDA-graph capture in the bench: refused where it cannot work, equal on GPU."""

import copy

import pytest
import torch

from affmae import create_model
from affmae.bench.step import Trainer
from affmae.ops.masking import make_mask


def test_cuda_graph_refused_on_cpu_and_fp16():
    model = create_model("aff_tiny")
    imgs = torch.randn(2, 1, 64, 64)
    mask = make_mask(2, (8, 8), 0.5)
    with pytest.raises(ValueError, match="cuda_graph"):
        Trainer(model, imgs, mask, dtype="bf16", cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["aff_tiny", "vit_tiny"])
def test_cuda_graph_step_matches_eager(name):
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.0).cuda()
    twin = copy.deepcopy(model)
    imgs = torch.randn(4, 1, 128, 128, device="cuda")
    mask = make_mask(4, (16, 16), 0.5, generator=torch.Generator().manual_seed(1)).cuda()
    eager = Trainer(model, imgs, mask, dtype="fp32")
    graph = Trainer(twin, imgs, mask, dtype="fp32", cuda_graph=True)
    # The graph trainer runs 3 warm-up steps before capture: bring the eager one level.
    for _ in range(3):
        eager.step()
    for i in range(3):
        a, b = eager.step().item(), graph.step().item()
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-5, f"step {i}: eager {a} vs graph {b}"
