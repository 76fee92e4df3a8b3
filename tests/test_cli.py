"""The ``affmae`` command: -h for every subcommand, missing modules, YAML + flags, user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from affmae import cli


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    missing = [c for c in cli.COMMANDS if c not in out]
    assert not missing, f"commands missing from -h: {missing}"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_help_works(command, capsys):
    module = cli.COMMANDS[command][0]
    if not cli._available(module):
        assert cli.main([command, "-h"]) == 2
        err = capsys.readouterr().err
        assert f"not available: {module} missing" in err, err
        return
    with pytest.raises(SystemExit) as e:
        cli.main([command, "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"usage: affmae {command}" in out, out[:500]


def test_pretrain_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "-h"])
    out = capsys.readouterr().out
    for flag in ("--data", "--size", "--mask-ratio", "--mask-kind", "--perlin-scales",
                 "--batch-size", "--grad-accum", "--lr", "--warmup-steps", "--betas",
                 "--precision", "--device", "--resume", "--config", "--model-overrides",
                 "--skip-bad", "--crop", "--ckpt-every", "--figure-every", "--log-every"):
        assert flag in out, f"{flag} missing from `affmae pretrain -h`"


def test_missing_module_is_reported_not_a_crash(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("affmae.no_such_module", "not here"))
    assert cli.main(["ghost", "--anything"]) == 2
    assert "not available: affmae.no_such_module missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the other commands still work
        cli.main(["-h"])
    assert e.value.code == 0


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "affmae.cli", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "affmae" in proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    from affmae.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("cli"), 4, (64, 64), seed=0) / "images"


def test_yaml_config_with_flag_override_runs(four_images, tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({
        "data": str(four_images), "size": 64, "model": "aff_tiny", "batch_size": 2,
        "grad_accum": 1, "steps": 5, "lr": 1e-3, "warmup_steps": 1, "device": "cpu",
        "num_workers": 0, "figure_every": 0, "progress": False, "out": str(tmp_path / "y")}))
    out = tmp_path / "flag"
    code = cli.main(["pretrain", "--config", str(y), "--steps", "1", "--out", str(out),
                     "--mask-kind", "uniform"])
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["steps"], saved["mask_kind"], saved["batch_size"]) == (1, "uniform", 2), saved
    assert not (tmp_path / "y").exists(), "the YAML out was used despite --out"


def test_unknown_yaml_key_is_a_one_line_error(tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("data: somewhere\nmask_ration: 0.5\n")
    assert cli.main(["pretrain", "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert "affmae pretrain: error:" in err and "mask_ration" in err, err


def test_corrupt_image_error_names_the_file(four_images, tmp_path, capsys):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(four_images, data)
    (data / "zz_broken.png").write_bytes(b"not an image")
    code = cli.main(["pretrain", "--data", str(data), "--size", "64", "--model", "aff_tiny",
                     "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "zz_broken.png" in err, err


def test_quick_demo_runs_and_writes_its_outputs(tmp_path, capsys):
    code = cli.main(["demo", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "lower)" in out and list((tmp_path / "pretrain" / "figures").glob("*.png")), out
    assert (tmp_path / "pretrain" / "model.safetensors").is_file()
