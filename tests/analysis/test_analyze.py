"""``affmae analyze`` (issue 6): every figure and number for a tiny checkpoint, spectrum-only
mode, checkpoint defaults, determinism, bad inputs; PCA colours that separate regions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from affmae import cli, create_model
from affmae.analysis.figures import plot_effective_rank, plot_token_maps
from affmae.analysis.model_figures import model_family
from affmae.analysis.pca import pca_rgb
from affmae.data.synthetic import write_dataset
from affmae.models import registry
from affmae.models.registry import config_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AFF_FIGURES = ("effective_rank", "pca", "token_maps_unmasked", "token_maps_masked",
               "recon_perlin_r0.50", "recon_perlin_r0.75", "recon_uniform_r0.50",
               "recon_uniform_r0.75", "mask_spectra", "mask_examples")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    aff = create_model("aff_tiny")
    ckpt = root / "aff_tiny.safetensors"
    registry.save_safetensors(aff, ckpt, data_stats={"mean": 0.45, "std": 0.2})
    data = write_dataset(root / "data", 3, size=(64, 64), seed=0) / "images"
    return root, ckpt, data


def _assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path}: not a PNG or empty ({len(data)} B)"


def _analyze(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["analyze", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_aff_checkpoint_writes_every_figure_and_per_stage_ranks(setup, tmp_path, capsys):
    _, ckpt, data = setup
    out = tmp_path / "out"
    rc, stdout, err = _analyze(capsys, "--checkpoint", ckpt, "--data", data, "--out", out,
                               "--size", 64, "--num-images", 2, "--show", 2, "--num-masks", 4)
    assert rc == 0, err
    for name in AFF_FIGURES:
        _assert_png(out / f"{name}.png")
    res = json.loads((out / "analysis.json").read_text())
    assert sorted(res["files"]) == sorted(AFF_FIGURES), f"files listed: {sorted(res['files'])}"
    er = res["effective_rank"]
    assert er["layers"] == ["stage 1", "stage 2", "stage 3", "stage 4"], er["layers"]
    for key in ("unmasked", "masked", "unmasked_centered", "masked_centered"):
        vals = er[key]
        assert len(vals) == 4 and all(0.0 < v <= 1.0 + 1e-9 for v in vals), f"{key}: {vals}"
    # 64 px, P = 8: 64 patches unmasked (d_s 0.4: 64 -> 25 -> 10 -> 4), 32 visible at r = 0.5.
    assert er["tokens_per_image"] == {"unmasked": [64, 25, 10, 4], "masked": [32, 12, 4, 1]}, er
    assert er["tokens_pooled_unmasked"] == [128, 50, 20, 8], er["tokens_pooled_unmasked"]
    assert er["dims"] == [32, 48, 64, 96] and er["num_images"] == 2, er
    assert res["pca"]["layers"][0] == "decoder, stage 4 cross-attention" and len(res["pca"]["layers"]) == 4
    recs = {(r["kind"], r["ratio"]): r["mse_masked"] for r in res["reconstruction"]}
    assert set(recs) == {(k, r) for k in ("perlin", "uniform") for r in (0.5, 0.75)}, recs
    assert all(math.isfinite(v) and v > 0 for v in recs.values()), recs
    assert res["data_stats"] == {"mean": 0.45, "std": 0.2, "source": "checkpoint"}
    assert res["spectra"]["n_images"] == 2 and res["model_family"] == "aff"
    assert "effective rank (masked): stage 1" in stdout, stdout


def test_spectrum_only_without_checkpoint(setup, tmp_path, capsys):
    _, _, data = setup
    out = tmp_path / "spec"
    rc, stdout, err = _analyze(capsys, "--data", data, "--out", out, "--size", 64,
                               "--num-masks", 4)
    assert rc == 0, err
    assert "no --checkpoint: only the mask spectra" in stdout, stdout
    for name in ("mask_spectra", "mask_examples"):
        _assert_png(out / f"{name}.png")
    written = sorted(p.name for p in out.iterdir())
    assert written == ["analysis.json", "mask_examples.png", "mask_spectra.png"], written
    res = json.loads((out / "analysis.json").read_text())
    assert res["checkpoint"] is None and "effective_rank" not in res, sorted(res)
    assert res["spectra"]["n_images"] == 3 and math.isfinite(res["spectra"]["slopes"]["images"])


def test_vit_training_checkpoint_defaults_and_determinism(setup, tmp_path, capsys):
    """A .pt training checkpoint without data_stats: size, mask ratio and Perlin scales come from
    its job config, statistics from the folder; two runs give identical numbers."""
    _, _, data = setup
    torch.manual_seed(1)
    vit = create_model("vit_tiny")
    ckpt = tmp_path / "vit.pt"
    torch.save({"model_name": "vit_tiny", "model_config": config_dict(vit),
                "model": vit.state_dict(),
                "config": {"size": [48, 64], "crop": "resize", "mask_ratio": 0.75,
                           "mask_kind": "uniform", "perlin_scales": [3]}}, ckpt)
    results = []
    for run in ("a", "b"):
        rc, stdout, err = _analyze(capsys, "--checkpoint", ckpt, "--data", data, "--out",
                                   tmp_path / run, "--num-images", 2, "--show", 1,
                                   "--num-masks", 2, "--recon-ratios", 0.5, "--recon-kinds",
                                   "perlin")
        assert rc == 0, err
        results.append(json.loads((tmp_path / run / "analysis.json").read_text()))
    res = results[0]
    assert res["size"] == [48, 64] and res["grid_hw"] == [6, 8], res["size"]
    assert res["effective_rank"]["mask"] == {"kind": "uniform", "ratio": 0.75,
                                             "perlin_scales": [3.0]}, res["effective_rank"]["mask"]
    assert res["spectra"]["ratio"] == 0.75 and res["spectra"]["perlin_scales"] == [3.0]
    assert res["data_stats"]["source"].startswith("computed from"), res["data_stats"]
    assert res["effective_rank"]["layers"] == ["block 1", "block 2"], res["effective_rank"]
    assert "token_maps" in res["skipped"] and res["token_maps"] is None
    _assert_png(tmp_path / "a" / "recon_perlin_r0.50.png")
    for key in ("effective_rank", "pca", "reconstruction", "spectra"):
        a = json.dumps(res[key]).replace("/a/", "/")
        b = json.dumps(results[1][key]).replace("/b/", "/")
        assert a == b, f"{key} differs between two runs with the same seed:\n{a}\n{b}"


def test_bad_size_fails_with_clear_message(setup, tmp_path, capsys):
    _, ckpt, data = setup
    rc, _, err = _analyze(capsys, "--checkpoint", ckpt, "--data", data, "--out", tmp_path,
                          "--size", 60)
    assert rc == 2 and "--size 60x60 is not a multiple of aff_tiny's patch size 8" in err, err
    rc, _, err = _analyze(capsys, "--data", data, "--out", tmp_path, "--size", 64, 36)
    assert rc == 2 and "--size 64x36 is not a multiple of --patch-size 8" in err, err
    rc, _, err = _analyze(capsys, "--checkpoint", ckpt, "--data", data, "--out", tmp_path,
                          "--size", 64, "--patch-size", 16)
    assert rc == 2 and "--patch-size 16 differs" in err, err
    assert not (tmp_path / "analysis.json").exists(), "a failed run wrote its JSON"


def test_pca_gives_distinct_colours_to_distinct_regions():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    region = torch.zeros(2, 8, 8, dtype=torch.bool)
    region[0, 2:6, 1:5] = True
    region[1, :3, :] = True
    feats = torch.where(region[..., None], a, b)  # (2, 8, 8, 16)
    rgb, explained = pca_rgb(feats)
    assert rgb.shape == (2, 8, 8, 3) and np.isfinite(rgb).all()
    inside, outside = rgb[region.numpy()], rgb[~region.numpy()]
    spread = max(np.ptp(inside, axis=0).max(), np.ptp(outside, axis=0).max())
    assert spread < 1e-9, f"one feature vector drew several colours (spread {spread})"
    gap = np.abs(inside[0] - outside[0]).max()
    assert gap > 0.9, f"two regions drew near colours {inside[0]} vs {outside[0]}"
    # Two distinct vectors span one direction: components 2-3 carry no variance and stay flat.
    assert explained[0] > 0.999 and np.allclose(rgb[..., 1:], 0.5), explained

    # With noise, every position still sits nearer its own region's colour.
    noisy = feats + 0.05 * torch.randn(feats.shape, generator=gen)
    rgb, _ = pca_rgb(noisy)
    c_in = rgb[region.numpy()].mean(0)
    c_out = rgb[~region.numpy()].mean(0)
    d_in = np.linalg.norm(rgb - c_in, axis=-1)
    d_out = np.linalg.norm(rgb - c_out, axis=-1)
    wrong = int(((d_in < d_out) != region.numpy()).sum())
    assert wrong == 0, f"{wrong} positions drawn nearer the other region's colour"

    # Collapsed features (all equal) draw a uniform grey, not amplified round-off.
    flat, ex = pca_rgb(torch.ones(1, 4, 4, 8) * 3.0)
    assert np.all(flat == 0.5) and np.all(ex == 0), (flat.min(), flat.max(), ex)


def test_plot_and_model_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="3 values for 4 labels"):
        plot_effective_rank({"x": [0.1, 0.2, 0.3]}, ["a", "b", "c", "d"], tmp_path / "r.png")
    imgs = np.zeros((1, 16, 16))
    pos = [np.zeros((1, 4, 2))]
    with pytest.raises(ValueError, match="patch_size=8"):
        plot_token_maps(imgs, pos, 8, tmp_path / "t.png", hidden=np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match=r"\(AFFMAE or ViTMAE\), got Linear"):
        model_family(torch.nn.Linear(2, 2))


def test_compare_puts_two_runs_side_by_side_and_rejects_mismatches(setup, tmp_path, capsys):
    _, ckpt, data = setup
    torch.manual_seed(1)  # a second, different checkpoint of the same architecture
    other = tmp_path / "other.safetensors"
    registry.save_safetensors(create_model("aff_tiny"), other,
                              data_stats={"mean": 0.45, "std": 0.2})
    runs = {}
    for name, c in (("first", ckpt), ("second", other)):
        rc, _, err = _analyze(capsys, "--checkpoint", c, "--data", data, "--out", tmp_path / name,
                              "--size", 64, "--num-images", 2, "--show", 1, "--num-masks", 2,
                              "--recon-ratios", 0.5, "--recon-kinds", "perlin")
        assert rc == 0, err
        runs[name] = json.loads((tmp_path / name / "analysis.json").read_text())["effective_rank"]
    out = tmp_path / "cmp"
    rc, stdout, err = _analyze(capsys, "--compare", tmp_path / "first/analysis.json",
                               tmp_path / "second/analysis.json", "--labels", "A", "B",
                               "--out", out)
    assert rc == 0, err
    _assert_png(out / "effective_rank_compare.png")
    table = json.loads((out / "compare.json").read_text())
    assert table["layers"] == runs["first"]["layers"], table["layers"]
    assert table["runs"]["A"]["unmasked"] == runs["first"]["unmasked"], table["runs"]["A"]
    assert table["runs"]["B"]["masked"] == runs["second"]["masked"], table["runs"]["B"]
    assert runs["first"]["unmasked"] != runs["second"]["unmasked"], "the two runs are identical"
    assert "A: effective rank (unmasked) stage 1" in stdout, stdout

    # A run measured on other images is not comparable: an error naming the file.
    rc, _, err = _analyze(capsys, "--checkpoint", other, "--data", data, "--out",
                          tmp_path / "third", "--size", 64, "--num-images", 3, "--show", 1,
                          "--num-masks", 2, "--recon-ratios", 0.5, "--recon-kinds", "perlin")
    assert rc == 0, err
    third = tmp_path / "third/analysis.json"
    rc, _, err = _analyze(capsys, "--compare", tmp_path / "first/analysis.json", third,
                          "--out", out)
    assert rc == 2 and f"{third}: num_images 3 differs" in err, err
    rc, _, err = _analyze(capsys, "--compare", third, "--labels", "A", "B", "--out", out)
    assert rc == 2 and "--compare needs at least two" in err, err
    rc, _, err = _analyze(capsys, "--compare", tmp_path / "first/analysis.json", third,
                          "--labels", "A", "--out", out)
    assert rc == 2 and "--labels gives 1 names for 2" in err, err
    rc, _, err = _analyze(capsys, "--out", out)
    assert rc == 2 and "--data is required" in err, err
