"""`affmae bench` end to end on CPU with tiny models, plus its OOM handling and scaling fit."""

from __future__ import annotations

import json

import pytest
import torch

from affmae import list_models
from affmae.bench import cli


def _models():
    names = ["vit_tiny"]
    if "aff_tiny" in list_models():
        names.append("aff_tiny")
    return names


def test_bench_cli_cpu_table_json_png(tmp_path, capsys):
    out = tmp_path / "bench.json"
    models = _models()
    rc = cli.main(["--models", *models, "--crossmae", "0.5", "--resolutions", "64", "96",
                   "--batch", "2", "--steps", "1", "--warmup", "1", "--dtype", "fp32",
                   "--device", "cpu", "--out", str(out), "--profile", "--profile-res", "64"])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert data["complete"] is True
    specs = data["meta"]["models"]
    assert "vit_tiny_crossmae:pred_ratio=0.5" in specs, specs
    rows = data["results"]
    assert len(rows) == 2 * len(specs), [(r["model"], r["resolution"]) for r in rows]
    for r in rows:
        where = f"{r['model']} at {r['resolution']}: {r}"
        assert r["status"] == "ok", where
        assert r["gflops"] > 0 and r["gmacs"] == pytest.approx(r["gflops"] / 2), where
        assert r["uncounted_ops"] == [], where
        assert r["step_ms"] > 0 and r["img_s"] > 0, where
        assert r["peak_mem_gib"] is None and r["timer"] == "wall clock", where
        assert r["tokens"] == (r["resolution"] // 8) ** 2, where
        assert r["params"] > 0, where
        assert r["model"] in text
    # CrossMAE-style variants count fewer FLOPs (they decode half of the masked patches)
    by = {(r["model"], r["resolution"]): r["gflops"] for r in rows}
    assert by[("vit_tiny_crossmae:pred_ratio=0.5", 96)] < by[("vit_tiny", 96)], by
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["dtype"] == "fp32"
    assert set(data["scaling"]) == set(specs)
    assert all(r["baseline"] == "vit_tiny" for r in data["ratios"])
    assert len(data["profiles"]) == len(specs)
    for p in data["profiles"]:
        labels = {row["label"] for row in p["rows"]}
        assert p["status"] == "ok", p
        assert any(lab.startswith("decoder") for lab in labels), (p["model"], labels)
        bwd = sum(row["bwd_ms"] for row in p["rows"] if not row["label"].startswith("step/"))
        assert bwd > 0, f"{p['model']}: no backward time attributed to model labels: {p['rows']}"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no PNG written"
    assert "GMACs" in text and "relative to vit_tiny" in text and "exponent" in text


def test_bench_reports_oom_and_goes_on(tmp_path, capsys, monkeypatch):
    real = cli.measure_steps

    def fake(trainer, steps, warmup):
        if trainer.imgs.shape[-1] == 96:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(trainer, steps, warmup)

    monkeypatch.setattr(cli, "measure_steps", fake)
    rc = cli.main(["--models", "vit_tiny", "--resolutions", "64", "96", "--batch", "1",
                   "--steps", "1", "--warmup", "1", "--dtype", "fp32", "--device", "cpu",
                   "--plot", str(tmp_path / "p.png")])
    text = capsys.readouterr().out
    assert rc == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("vit_tiny ")]
    assert lines[0].endswith("ok") and lines[1].endswith("OOM"), lines
    assert (tmp_path / "p.png").is_file()


def test_bench_rejects_unknown_model_and_bad_override():
    with pytest.raises(KeyError, match="unknown model"):
        cli.main(["--models", "vit_huge", "--device", "cpu"])
    with pytest.raises(TypeError, match="no field"):
        cli.main(["--models", "vit_tiny:widht=3", "--device", "cpu"])


def test_parse_spec_and_scaling_fit():
    assert cli.parse_spec("aff_small:pred_ratio=0.25,attention_backend=torch") == (
        "aff_small", {"pred_ratio": 0.25, "attention_backend": "torch"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.parse_spec("vit_small:depth")
    rows = [{"model": "q", "tokens": n, "step_ms": 3.0 * n**2} for n in (100, 200, 400)]
    rows += [{"model": "l", "tokens": n, "step_ms": 5.0 * n} for n in (100, 200, 400)]
    sc = cli.scaling(rows)
    assert sc["q"]["exponent"] == pytest.approx(2.0), sc["q"]
    assert sc["l"]["local_exponents"] == pytest.approx([1.0, 1.0]), sc["l"]


def test_compile_blocks_compiles_every_block_of_both_families():
    """Regional compilation wraps exactly the transformer blocks (running them compiled is a
    GPU-machine job: a CPU inductor build of aff_tiny takes minutes)."""
    import pytest

    from affmae import create_model
    from affmae.models.compiled import apply_compile, compile_blocks

    aff = create_model("aff_tiny")
    n_aff = sum(aff.config.depths) + len(aff.config.depths)  # encoder blocks + decoder blocks
    assert compile_blocks(aff) == n_aff
    vit = create_model("vit_tiny")
    n_vit = vit.config.depth + vit.config.decoder_depth
    assert compile_blocks(vit) == n_vit
    assert apply_compile(create_model("aff_tiny"), "none").__class__.__name__ == "AFFMAE"
    with pytest.raises(ValueError, match="compile mode"):
        apply_compile(aff, "everything")
    with pytest.raises(ValueError, match="no transformer block"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_a_stopped_run_keeps_the_rows_it_measured(tmp_path, capsys, monkeypatch):
    """Each row goes to stderr as it is measured and into the JSON so far, so a run stopped at
    a later size (a time limit, Ctrl-C, a crash) keeps what it finished."""
    real, calls = cli.bench_one, []

    def stop_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cli, "bench_one", stop_on_second)
    out = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--models", "vit_tiny", "--resolutions", "64", "96", "--batch", "1",
                  "--steps", "1", "--warmup", "1", "--dtype", "fp32", "--device", "cpu",
                  "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False
    assert [(r["model"], r["resolution"], r["status"]) for r in data["results"]] == [
        ("vit_tiny", 64, "ok")]
    err = capsys.readouterr().err
    assert any(ln.startswith("vit_tiny ") and ln.endswith("ok") for ln in err.splitlines()), err
    assert not (tmp_path / "b.json.tmp").exists()


def test_plot_labels_token_counts_within_one_decade():
    from affmae.bench.plot import make_figure

    rows = [{"model": m, "resolution": r, "tokens": t, "gflops": g, "peak_mem_gib": 1.0,
             "img_s": 100.0 / g, "step_ms": g}
            for m, g0 in (("aff", 1.0), ("vit", 4.0)) for r, t, g in ((512, 4096, g0), (768, 9216, 3 * g0))]
    fig = make_figure(rows)
    ax = fig.axes[3]  # step time against tokens, log-log
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert list(ax.get_xticks()) == [4096, 9216]
    assert all(labels) and len(labels) == 2, labels


def test_environment_marks_a_checkout_that_differs_from_its_commit(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    src = repo / "pkg" / "m.py"
    src.write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(git + cmd, check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(cli, "__file__", str(src))  # environment() asks git beside the module
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu"])
    assert cli.environment(args, torch.device("cpu"))["git_commit"] == head
    src.write_text("x = 2\n")
    assert cli.environment(args, torch.device("cpu"))["git_commit"] == head + "-dirty"
