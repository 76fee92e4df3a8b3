"""``affmae finetune``: config, data checks, layer-wise lr decay, end to end, resume, demo hook."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from labelled import VALUES, write_labelled
from affmae import create_model
from affmae.data.synthetic import write_dataset
from affmae.train.config import config_from_args
from affmae.train.distributed import context_from_env
from affmae.train.finetune import (FinetuneConfig, FinetuneJob, add_arguments, finetune_demo,
                                   run_finetune)

STATS = {"mean": 0.5, "std": 0.25}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_labelled(tmp_path_factory.mktemp("ft") / "data", 12, (48, 48), seed=0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An aff_tiny MAE 'pretraining' checkpoint (random weights) with data_stats."""
    from affmae.models.registry import save_safetensors

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("mae") / "mae.safetensors"
    save_safetensors(create_model("aff_tiny"), path, data_stats=STATS)
    return path


def _cfg(data, out, **kw) -> FinetuneConfig:
    base = dict(data=str(data), size=32, batch_size=4, steps=3, warmup_steps=1, lr=1e-3,
                val_fraction=0.25, eval_every=2, device="cpu", num_workers=0, out=str(out),
                log_every=1, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _parse(argv: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(FinetuneConfig, parser.parse_args(argv))


# ---- configuration ----------------------------------------------------------------------------

def test_config_defaults_and_flags():
    cfg = FinetuneConfig(data="x")
    assert cfg.epochs == 700 and cfg.val_fraction == 0.1 and cfg.layer_decay is None
    assert cfg.loss == "bce_dice" and cfg.augment and cfg.out == "runs/finetune"
    cfg = _parse(["--data", "d", "--class-values", "0", "255", "--class-names", "membrane",
                  "cell", "--class-weights", "1", "3", "--label-fraction", "0.05",
                  "--test-data", "t", "--loss", "focal_dice", "--focal-gamma", "1.5",
                  "--checkpoint", "c.pt", "--layer-decay", "0.75", "--no-augment"])
    assert cfg.class_values == (0, 255) and cfg.class_names == ("membrane", "cell")
    assert cfg.class_weights == (1.0, 3.0) and cfg.label_fraction == 0.05
    assert cfg.test_data == "t" and cfg.val_fraction is None and cfg.focal_gamma == 1.5
    assert cfg.layer_decay == 0.75 and not cfg.augment and cfg.checkpoint == "c.pt"


@pytest.mark.parametrize("kwargs, match", [
    (dict(test_data="t", val_fraction=0.2), "not both"),
    (dict(focal_gamma=2.0), "focal_dice"),
    (dict(class_values=(0, 255), class_names=("a",)), "1 class names"),
    (dict(class_values=(0, 0)), "distinct"),
    (dict(class_weights=(0.0, 0.0)), "class_weights"),
    (dict(label_fraction=0.0), "label_fraction"),
    (dict(layer_decay=1.5), "layer_decay"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(class_names=("a b", "a_b")), "clashing"),
])
def test_config_rejects_contradictions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(data="x", **kwargs)


# ---- data checks ------------------------------------------------------------------------------

def test_bad_label_values_name_the_file_and_values(tmp_path, capsys):
    from affmae.cli import main

    bad_data = write_labelled(tmp_path / "bad", 4, (48, 48), seed=3)
    bad = bad_data / "masks" / "0002.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[:3, :3] = 7
    arr[5, 5] = 250
    Image.fromarray(arr).save(bad)
    rc = main(["finetune", "--data", str(bad_data), "--model", "aff_tiny", "--size", "32",
               "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "0002.png" in err and "[7, 250]" in err, err


def test_class_weights_must_match_the_classes(data, tmp_path):
    with pytest.raises(ValueError, match="2 class weights"):
        FinetuneJob(_cfg(data, tmp_path, model="aff_tiny", class_weights=(1.0, 2.0)),
                    context_from_env("cpu"))


def test_checkpoint_model_mismatch_and_segmenter_checkpoint_are_refused(data, pretrained,
                                                                        tmp_path):
    from affmae.models.registry import save_safetensors

    with pytest.raises(ValueError, match="differs from the checkpoint"):
        FinetuneJob(_cfg(data, tmp_path, checkpoint=str(pretrained), model="aff_small"),
                    context_from_env("cpu"))
    seg = create_model("segmenter", backbone="aff_tiny", num_classes=3)
    save_safetensors(seg, tmp_path / "seg.safetensors", data_stats=STATS)
    with pytest.raises(ValueError, match="already a fine-tuned segmenter"):
        FinetuneJob(_cfg(data, tmp_path, checkpoint=str(tmp_path / "seg.safetensors")),
                    context_from_env("cpu"))


# ---- the job: weights, statistics, LLRD groups, label fraction ----------------------------------

@pytest.mark.parametrize("backbone", ["aff_tiny", "vit_tiny"])
def test_job_loads_pretrained_weights_stats_and_llrd_groups(data, pretrained, tmp_path, backbone):
    from affmae.models.registry import read_checkpoint, save_safetensors

    if backbone != "aff_tiny":
        pretrained = tmp_path / f"{backbone}.safetensors"
        save_safetensors(create_model(backbone), pretrained, data_stats=STATS)
    job = FinetuneJob(_cfg(data, tmp_path, checkpoint=str(pretrained)), context_from_env("cpu"))
    assert job.model.config.backbone == backbone
    mae = read_checkpoint(pretrained)["model"]
    own = job.model.backbone.state_dict()
    assert own.keys() <= mae.keys(), sorted(set(own) - set(mae))[:5]
    assert all(torch.equal(own[k], mae[k]) for k in own), "pretrained weights not loaded"
    assert job.data_stats == STATS, f"stats must come from the checkpoint, got {job.data_stats}"
    assert job.layer_decay == 0.6, "checkpoint runs default to the paper's 0.6"
    L = job.model.num_layers
    names = {id(p): n for n, p in job.model.named_parameters()}
    for g in job.param_groups():
        for p in g["params"]:
            want = 0.6 ** (L + 1 - job.model.layer_id(names[id(p)]))
            assert g["lr_scale"] == pytest.approx(want), (names[id(p)], g["lr_scale"], want)
    scales = sorted({g["lr_scale"] for g in job.param_groups()})
    assert scales[0] == pytest.approx(0.6 ** (L + 1)) and scales[-1] == 1.0, scales
    imgs, tgts = zip(*(job.dataset[i] for i in range(2)))
    out = job.loss(job.model, (torch.stack(imgs), torch.stack(tgts)), 0, 0)
    out["loss"].backward()
    assert set(out) == {"loss", "loss_bce", "loss_dice"} and torch.isfinite(out["loss"]), out
    scratch = FinetuneJob(_cfg(data, tmp_path, model="aff_tiny"), context_from_env("cpu"))
    assert scratch.layer_decay == 1.0 and scratch.data_stats["std"] != STATS["std"]


def test_label_fraction_is_nested_and_small_sets_repeat(data, tmp_path):
    ctx = context_from_env("cpu")
    jobs = {f: FinetuneJob(_cfg(data, tmp_path, model="aff_tiny", label_fraction=f,
                                batch_size=8), ctx) for f in (0.25, 0.5, 1.0)}
    pairs = {f: [p.image.name for p in j.dataset.base.pairs] for f, j in jobs.items()}
    assert [len(pairs[f]) for f in (0.25, 0.5, 1.0)] == [3, 5, 9], pairs
    assert set(pairs[0.25]) <= set(pairs[0.5]) <= set(pairs[1.0]), pairs
    small = jobs[0.25]
    assert small.repeats == 3 and len(small.dataset) == 9, (small.repeats, len(small.dataset))
    small.dataset.set_epoch(0)
    first, again = small.dataset[0][0], small.dataset[3][0]  # pair 0, repeats 0 and 1
    assert not torch.equal(first, again), "repeats of a pair must get their own crops"


# ---- end to end -------------------------------------------------------------------------------

def test_finetune_cli_end_to_end(data, pretrained, tmp_path):
    from affmae.cli import main
    from affmae.train.checkpoint import load_checkpoint
    from affmae.train.predict import load_segmenter

    out = tmp_path / "run"
    rc = main(["finetune", "--data", str(data), "--checkpoint", str(pretrained), "--size", "32",
               "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--lr", "1e-3",
               "--val-fraction", "0.25", "--eval-every", "2", "--device", "cpu",
               "--num-workers", "0", "--out", str(out), "--no-progress",
               "--class-weights", "0.2", "2", "3"])
    assert rc == 0
    for name in ("best.pt", "best.safetensors", "latest.pt", "model.safetensors", "eval.csv",
                 "metrics.json", "log.csv", "config.yaml"):
        assert (out / name).is_file(), f"{name} missing: {sorted(p.name for p in out.iterdir())}"
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "3"], rows
    assert set(rows[0]) == {"step", "miou", "iou_cyto", "iou_mem", "iou_mito"}, rows[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["miou"] == max(float(r["miou"]) for r in rows), metrics["best"]
    assert metrics["class_values"] == list(VALUES) and metrics["layer_decay"] == 0.6
    # LLRD still in force after 3 steps: the optimizer's lrs differ by exactly 0.6 ** (L + 1).
    latest = load_checkpoint(out / "latest.pt")
    lrs = [g["lr"] for g in latest["optimizer"]["param_groups"]]
    L = create_model("segmenter", backbone="aff_tiny", num_classes=3).num_layers
    assert min(lrs) / max(lrs) == pytest.approx(0.6 ** (L + 1), rel=1e-9), lrs
    assert latest["step"] == 3 and latest["data_stats"] == STATS
    _, info = load_segmenter(out / "best.safetensors")
    assert info.class_values == VALUES and info.window == (32, 32), info


def test_resume_replays_the_uninterrupted_run_exactly(data, tmp_path):
    kw = dict(model="aff_tiny", val_fraction=0.0, steps=4, ckpt_every=2)
    run_finetune(_cfg(data, tmp_path / "full", **kw))
    first = _cfg(data, tmp_path / "part", **dict(kw, steps=2))
    run_finetune(first)
    run_finetune(_cfg(data, tmp_path / "part", resume="auto", **kw))

    def losses(run):
        with open(run / "log.csv", newline="") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]

    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert full == part, f"uninterrupted {full} vs resumed {part}"


def test_finetune_demo_hook(tmp_path, pretrained):
    demo_data = write_dataset(tmp_path / "data", 16, (64, 64), seed=2)
    result = finetune_demo(pretrained, demo_data, tmp_path / "ft", steps=2, device="cpu")
    assert 0.0 <= result["miou"] <= 1.0, result
    assert set(result["per_class"]) == {"cytoplasm", "membrane", "mitochondrion"}, result
    assert result["checkpoint"].is_file() and result["figure"] is not None, result


# ---- CUDA graph -------------------------------------------------------------------------------

def test_cuda_graph_choice(data, tmp_path, capsys):
    """Unset: off on CPU, silently; asked for on CPU: an error before any training."""
    job = FinetuneJob(_cfg(data, tmp_path / "a", model="aff_tiny"), context_from_env("cpu"))
    assert job.graphed is None and job.autocast_cache and job.grads_to_none
    assert "CUDA graph" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        FinetuneJob(_cfg(data, tmp_path / "b", model="aff_tiny", cuda_graph=True),
                    context_from_env("cpu"))
    assert _parse(["--data", "x", "--no-cuda-graph"]).cuda_graph is False
    # Under torchrun never, even when asked: the loss all-reduces its Dice sums in the forward.
    from affmae.train.distributed import DistContext
    from affmae.train.graphs import cuda_graph_why_not

    two = DistContext(rank=0, local_rank=0, world_size=2, device=torch.device("cuda"))
    asked = _cfg(data, tmp_path / "c", cuda_graph=True)
    assert "one process only" in cuda_graph_why_not(asked, two, ranks_ok=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_finetune_matches_eager(data, pretrained, tmp_path, capsys):
    """A graphed fine-tuning run (the default on one GPU) tracks the eager one step by step,
    and says so in its header; evaluation (eager, eval mode) runs next to the graph."""
    kw = dict(device="cuda", precision="bf16", checkpoint=str(pretrained), size=48,
              batch_size=4, grad_accum=2, steps=6, eval_every=3, augment=False, lr=1e-4,
              model_overrides={"drop_path": 0.0})
    eager = run_finetune(_cfg(data, tmp_path / "eager", cuda_graph=False, **kw))
    capsys.readouterr()
    graph = run_finetune(_cfg(data, tmp_path / "graph", **kw))
    assert ", CUDA graph |" in capsys.readouterr().err

    def losses(run):
        with open(run / "log.csv", newline="") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    le, lg = losses(tmp_path / "eager"), losses(tmp_path / "graph")
    assert len(le) == len(lg) == 6
    for a, b in zip(le, lg):
        assert abs(a - b) <= 1e-2 * abs(a), f"eager {le} vs graphed {lg}"
    assert eager.last is not None and graph.last is not None  # evaluated next to the graph
