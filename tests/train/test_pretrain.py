"""End-to-end pretraining on CPU: exact resume, checkpoint contents, overfitting, bad inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import affmae.train.loop as loop
from affmae.train.config import PretrainConfig
from affmae.train.logger import read_log
from affmae.train.pretrain import PretrainJob, run_pretrain

LOSS_KEYS = ("loss", "loss_rec")


def _cfg(data, out, **kw) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), size=64, model="aff_tiny", batch_size=2,
                grad_accum=2, steps=6, lr=2e-3, warmup_steps=2, min_lr=1e-5, device="cpu",
                num_workers=0, log_every=1, ckpt_every=3, figure_every=0, progress=False)
    base.update(kw)
    return PretrainConfig(**base)


class _Crash(RuntimeError):
    pass


def test_resume_reproduces_the_uninterrupted_run(images80, tmp_path, monkeypatch):
    # Random crops, drop-path, a random subset of queries (global RNG), gradient accumulation,
    # and a crash in the middle of an epoch (8 images, 4 per step: 2 steps per epoch).
    kw = dict(crop="random_crop", model_overrides={"drop_path": 0.1, "pred_ratio": 0.75})
    straight = run_pretrain(_cfg(images80, tmp_path / "a", **kw))
    assert len(straight.losses) == 6

    real_loss = PretrainJob.loss

    def crash_at_step_3(self, model, batch, step, micro):
        if step == 3 and micro == 1:
            raise _Crash("simulated crash after one micro-step of step 3")
        return real_loss(self, model, batch, step, micro)

    monkeypatch.setattr(PretrainJob, "loss", crash_at_step_3)
    with pytest.raises(_Crash):
        run_pretrain(_cfg(images80, tmp_path / "b", **kw))
    monkeypatch.setattr(PretrainJob, "loss", real_loss)
    ckpt = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (3, 1, 1), (
        f"checkpoint at {ckpt['step']}, epoch {ckpt['epoch']}, in-epoch {ckpt['step_in_epoch']}")
    resumed = run_pretrain(_cfg(images80, tmp_path / "b", resume="auto", **kw))
    assert len(resumed.losses) == 3, f"resumed run ran {len(resumed.losses)} steps, expected 3"

    a, b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], f"log steps {[r['step'] for r in b]}"
    for key in LOSS_KEYS:
        la, lb = [r[key] for r in a], [r[key] for r in b]
        assert la == lb, f"{key}: uninterrupted {la} != crash + resume {lb}"
    assert resumed.losses == straight.losses[3:]
    sa = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"final weights differ in {diff[:5]}"


def test_checkpoint_contents_and_exports(images64, tmp_path):
    from affmae import load_model
    from affmae.models.registry import config_dict

    cfg = _cfg(images64, tmp_path, steps=2, ckpt_every=2, grad_accum=1, figure_every=5)
    run_pretrain(cfg)
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    for key in ("model_name", "model_config", "model", "optimizer", "scaler", "step", "epoch",
                "step_in_epoch", "rng", "config", "data_stats", "world_size"):
        assert key in ckpt, f"checkpoint lacks {key!r}: {sorted(ckpt)}"
    assert ckpt["model_name"] == "aff_tiny" and ckpt["step"] == 2
    assert set(ckpt["data_stats"]) == {"mean", "std"} and ckpt["data_stats"]["std"] > 0
    assert isinstance(ckpt["rng"][0]["cpu"], torch.Tensor) and ckpt["config"]["size"] == [64, 64]
    for name in ("latest.pt", "model.safetensors"):
        model = load_model(tmp_path / name)
        assert config_dict(model) == ckpt["model_config"], f"{name} rebuilds another config"
        assert model.data_stats == ckpt["data_stats"], f"{name} lost data_stats"
    assert (tmp_path / "figures" / "step_0000002.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").is_file()
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "epoch", "loss"] and {"lr", "grad_norm", "img_s",
                                                        "time"} <= set(header), header


def test_tiny_mae_overfits_four_images(tmp_path, monkeypatch):
    from affmae.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "four", 4, (64, 64), seed=3) / "images"
    # A fixed batch (order and masks), so the only way down is memorising it.
    monkeypatch.setattr(loop, "batch_indices",
                        lambda n, cfg, epoch, start, stop, ctx: [[0, 1, 2, 3]] * (stop - start))
    real_mask = PretrainJob._mask
    monkeypatch.setattr(PretrainJob, "_mask", lambda self, b, seed: real_mask(self, b, 123))
    cfg = _cfg(data, tmp_path / "run", batch_size=4, grad_accum=1, steps=150, lr=5e-3,
               min_lr=5e-3, warmup_steps=5, weight_decay=0.0, mask_kind="uniform",
               ckpt_every=1000)
    losses = run_pretrain(cfg).losses
    assert all(math.isfinite(v) for v in losses), f"non-finite losses: {losses}"
    factor = losses[0] / min(losses[-5:])
    assert factor > 5, (f"loss fell only {factor:.2f}x in {len(losses)} steps: "
                        f"{[round(v, 3) for v in losses[::10]]}")


def test_non_finite_loss_names_the_step(images64, tmp_path, monkeypatch):
    real_loss = PretrainJob.loss

    def nan_at_step_1(self, model, batch, step, micro):
        out = real_loss(self, model, batch, step, micro)
        if step == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(PretrainJob, "loss", nan_at_step_1)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1 "):
        run_pretrain(_cfg(images64, tmp_path, steps=3, grad_accum=1))


def test_cuda_graph_is_refused_off_cuda(images64, tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        run_pretrain(_cfg(images64, tmp_path, cuda_graph=True))


def test_cuda_graph_default_is_on_only_where_measured():
    """Unset (the default): on for one CUDA process in bf16 / fp32; off elsewhere, saying why.
    An explicit --cuda-graph is refused where it cannot run (no CUDA); fp16 and torchrun are
    allowed when asked for."""
    from affmae.train.config import PretrainConfig
    from affmae.train.distributed import DistContext
    from affmae.train.graphs import cuda_graph_why_not

    def ctx(device, world=1):
        return DistContext(rank=0, local_rank=0, world_size=world, device=torch.device(device))

    import argparse

    from affmae.train.config import add_config_arguments, config_from_args

    for argv, want in (([], None), (["--cuda-graph"], True), (["--no-cuda-graph"], False)):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, PretrainConfig)
        got = config_from_args(PretrainConfig, parser.parse_args(["--data", "x", *argv])).cuda_graph
        assert got is want, (argv, got)
    auto, on = PretrainConfig(data="x"), PretrainConfig(data="x", cuda_graph=True)
    assert cuda_graph_why_not(auto, ctx("cuda")) is None
    assert "CUDA device" in cuda_graph_why_not(auto, ctx("cpu"))
    assert "off by default under torchrun" in cuda_graph_why_not(auto, ctx("cuda", 2))  # "stays off ..."
    assert cuda_graph_why_not(on, ctx("cuda", 2)) is None  # asked for: all_reduce sync
    fp16 = PretrainConfig(data="x", precision="fp16")
    assert "bf16 and fp32" in cuda_graph_why_not(fp16, ctx("cuda"))
    assert cuda_graph_why_not(PretrainConfig(data="x", precision="fp16", cuda_graph=True),
                              ctx("cuda")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_loss_gradients_match_eager():
    """Replays of the captured forward/backward give the eager losses, and gradients within the
    three-way rule (error against a float32 eager run <= 3x the eager bf16 run's + a floor), for
    a new input every replay (copied into the graph's static inputs) and two accumulated
    micro-steps (the second replay must add, not overwrite); and PyTorch's AccumulateGrad
    stream warning, which ``GraphedLoss`` turns off before capturing, never shows."""
    from affmae import create_model
    from affmae.ops.masking import num_masked
    from affmae.train.graphs import GraphedLoss, mae_loss

    torch.manual_seed(0)
    model = create_model("aff_small", drop_path=0.0).cuda().train()
    n = num_masked(16 * 16, 0.5)
    graphed = GraphedLoss(model, mae_loss(n))
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _graphed_vs_eager_steps(model, graphed, named, n, g)
    stream = [str(w.message)[:80] for w in caught if "AccumulateGrad" in str(w.message)]
    assert not stream, f"the graphed loss let PyTorch's stream warning through: {stream}"


def _graphed_vs_eager_steps(model, graphed, named, n, g):
    from affmae.ops.masking import make_mask
    from model_checks import grad_three_way

    for step in range(3):
        imgs = torch.randn(4, 1, 128, 128, generator=g).cuda()
        mask = make_mask(4, (16, 16), 0.5, "perlin", generator=g).cuda()
        grads = {}
        # graph first: the capture must not meet autograd nodes of an eager step still alive
        again = [f"eager_again{i}" for i in range(3)]
        for run in ("graph", "eager", *again, "fp32"):
            model.zero_grad(set_to_none=False)
            losses = []
            for _ in range(2):
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False,
                                    enabled=run != "fp32"):
                    out = (graphed(imgs, mask) if run == "graph"
                           else model(imgs, mask, num_masked=n))
                out["loss"].backward()
                losses.append(out["loss"].item())
                del out
            grads[run] = (losses[0], [p.grad.clone() for _, p in named])
        (lg, gg), (le, ge), (_, gf) = grads["graph"], grads["eager"], grads["fp32"]
        assert math.isclose(le, lg, rel_tol=1e-4), f"step {step}: loss eager {le} graph {lg}"
        # Eager bf16 is not deterministic (float32 atomics in the gathers' backward); on an
        # H200 the merges' score biases (near-cancelling sums) failed the plain rule in 2 of 4
        # runs, so the bound also takes eager's own run-to-run spread, over three reruns (one
        # draw of a scalar's noise is too noisy a bound: tests/model_checks.py).
        grad_three_way([k for k, _ in named], gf, ge, gg, f"step {step} graph",
                       same_again=[grads[r][1] for r in again])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_run_matches_eager_and_resumes(images80, tmp_path, monkeypatch):
    """A graphed run tracks the eager one (small lr: Adam's first steps turn float32-atomics
    noise in near-zero gradients into lr-sized updates), and a graphed run with drop-path and
    a pred_ratio subset, crashed and resumed (a new capture), tracks the uninterrupted one."""
    kw = dict(device="cuda", precision="bf16", model="aff_small", size=128, batch_size=4,
              grad_accum=2, steps=6, crop="resize", lr=1e-4)
    plain = {"drop_path": 0.0}
    eager = run_pretrain(_cfg(images80, tmp_path / "eager", model_overrides=plain,
                              cuda_graph=False, **kw))  # explicit: the default is on for CUDA
    graph = run_pretrain(_cfg(images80, tmp_path / "graph", model_overrides=plain,
                              cuda_graph=True, **kw))
    for a, b in zip(eager.losses, graph.losses):
        assert math.isclose(a, b, rel_tol=1e-2), f"eager {eager.losses} vs graphed {graph.losses}"

    rand = {"drop_path": 0.2, "pred_ratio": 0.5}
    straight = run_pretrain(_cfg(images80, tmp_path / "a", model_overrides=rand,
                                 cuda_graph=True, **kw))
    real_loss = PretrainJob.loss

    def crash_at_step_3(self, model, batch, step, micro):
        if step == 3:
            raise _Crash("simulated crash")
        return real_loss(self, model, batch, step, micro)

    monkeypatch.setattr(PretrainJob, "loss", crash_at_step_3)
    with pytest.raises(_Crash):
        run_pretrain(_cfg(images80, tmp_path / "b", model_overrides=rand, cuda_graph=True, **kw))
    monkeypatch.setattr(PretrainJob, "loss", real_loss)
    resumed = run_pretrain(_cfg(images80, tmp_path / "b", model_overrides=rand, cuda_graph=True,
                                resume="auto", **kw))
    for a, b in zip(straight.losses[3:], resumed.losses):
        assert math.isclose(a, b, rel_tol=1e-2), f"{straight.losses[3:]} vs {resumed.losses}"


@pytest.mark.parametrize("case, match", [
    ("corrupt", "broken.png"),
    ("empty", "no image files"),
    ("size", r"not a multiple of the patch size 8"),
    ("too_few", "fewer than one effective batch"),
])
def test_bad_inputs_fail_before_training(images64, tmp_path, case, match):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(images64, data)
    kw = {}
    if case == "corrupt":
        (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    elif case == "empty":
        shutil.rmtree(data)
        data.mkdir()
    elif case == "size":
        kw["size"] = 60
    elif case == "too_few":
        kw.update(batch_size=16, grad_accum=2)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_pretrain(_cfg(data, tmp_path / "out", **kw))
    assert not (tmp_path / "out" / "log.csv").exists(), "a training step ran before the error"


def test_skip_bad_skips_the_corrupt_file(images64, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(images64, data)
    (data / "broken.png").write_bytes(b"garbage")
    result = run_pretrain(_cfg(data, tmp_path / "out", steps=1, grad_accum=1, skip_bad=True))
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])


def test_accumulation_adds_into_own_buffers_not_static_ones():
    """The mechanism ``GraphedLoss`` guards against, on CPU: a backward that hands out a static
    buffer (as a CUDA-graphed backward does) is adopted as ``p.grad`` when ``p.grad`` is None,
    so the next replay would overwrite the accumulated gradient; with a pre-allocated ``.grad``
    (what GraphedLoss sets up, zeroed in place by the loop) accumulation adds correctly."""
    static = torch.zeros(3)

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p, g):
            ctx.g = g
            return p.sum()

        @staticmethod
        def backward(ctx, _):
            static.copy_(ctx.g)  # the "replay" writes its static gradient output
            return static.detach(), None

    g1, g2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    p = torch.zeros(3, requires_grad=True)
    Replay.apply(p, g1).backward()
    Replay.apply(p, g2).backward()
    assert p.grad.data_ptr() == static.data_ptr()  # adopted: the bug
    assert torch.equal(p.grad, 2 * g2)  # g1 lost
    q = torch.zeros(3, requires_grad=True)
    q.grad = torch.zeros(3)  # GraphedLoss's own buffer
    Replay.apply(q, g1).backward()
    Replay.apply(q, g2).backward()
    assert q.grad.data_ptr() != static.data_ptr()
    assert torch.equal(q.grad, g1 + g2)


def test_resume_of_a_checkpoint_that_predates_new_config_fields(images64, tmp_path, capsys):
    """A checkpoint written before a config field existed (here: the run's cuda_graph and the
    model's grad_checkpoint) resumes: a missing field counts as its default, not as a change;
    so does one written under another execution backend (norm_backend "torch", the default of
    session 3), which changes how the model runs, not what it computes."""
    run_pretrain(_cfg(images64, tmp_path, steps=3, grad_accum=1))
    path = tmp_path / "latest.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_config"]["grad_checkpoint"], ckpt["config"]["cuda_graph"]
    ckpt["model_config"]["norm_backend"] = "torch"
    torch.save(ckpt, path)
    capsys.readouterr()
    resumed = run_pretrain(_cfg(images64, tmp_path, steps=5, grad_accum=1, resume="auto"))
    assert len(resumed.losses) == 2
    err = capsys.readouterr().err
    assert "steps (3 -> 5)" in err  # a real change is still named
    assert "cuda_graph" not in err and "norm_backend" not in err, err


def test_graphed_runs_pin_batches_in_the_main_thread(monkeypatch):
    """A CUDA-graphed loss keeps the loader's pin-memory thread off CUDA (its cudaHostAlloc
    calls broke a capture on the H200): the loader pins only for eager CUDA runs, and a graphed
    run pins in ``_to_device``, in the training thread. ``make_graphed_callables`` gets
    ``capture_error_mode="thread_local"`` where it takes one."""
    from types import SimpleNamespace

    import torch

    from affmae.train import graphs, loop

    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    assert loop._pin_in_loader(SimpleNamespace(graphed=None), cuda)
    assert not loop._pin_in_loader(SimpleNamespace(graphed=object()), cuda)
    assert not loop._pin_in_loader(SimpleNamespace(graphed=None), cpu)

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: t)  # no GPU here: a stand-in copy
    batch = {"image": torch.zeros(2, 1, 8, 8), "mask": [torch.zeros(2, 64)]}
    loop._to_device(batch, torch.device("cuda"), pin=True)
    assert pinned == [torch.Size([2, 1, 8, 8]), torch.Size([2, 64])]
    loop._to_device(batch, torch.device("cuda"), pin=False)
    assert len(pinned) == 2, "pinned without being asked"

    def new_api(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None,
                capture_error_mode="global"):
        pass

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", new_api)
    assert graphs.capture_mode_kwargs() == {"capture_error_mode": "thread_local"}
    monkeypatch.setattr(torch.cuda, "make_graphed_callables",
                        lambda callables, sample_args, num_warmup_iters=3: None)
    assert graphs.capture_mode_kwargs() == {}


def test_backward_runs_with_autograd_multithreading_off(images64, tmp_path, monkeypatch):
    # The trainer runs every backward on the calling thread (affmae.devices.
    # backward_on_calling_thread): autograd's multithreading flag, which a gradient hook sees in
    # the backward's thread-local state, is off there, and back on after the run.
    real_loss = PretrainJob.loss
    seen = []

    def loss_with_hook(self, model, batch, step, micro):
        out = real_loss(self, model, batch, step, micro)
        out["loss"].register_hook(lambda g: seen.append(torch._C._is_multithreading_enabled()))
        return out

    monkeypatch.setattr(PretrainJob, "loss", loss_with_hook)
    assert torch._C._is_multithreading_enabled()
    run_pretrain(_cfg(images64, tmp_path, steps=2, grad_accum=2, ckpt_every=2))
    assert seen == [False] * 4, f"multithreading flag in the 4 backwards: {seen}"
    assert torch._C._is_multithreading_enabled(), "the trainer left autograd multithreading off"
