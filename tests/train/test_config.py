"""PretrainConfig: validation, YAML + flag precedence, unknown keys, -h generation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from affmae.train.config import (PretrainConfig, add_config_arguments, config_from_args,
                                 save_yaml)


def _parse(argv: list[str]) -> PretrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    return config_from_args(PretrainConfig, parser.parse_args(argv))


def test_defaults_follow_the_paper():
    cfg = PretrainConfig(data="x")
    assert cfg.betas == (0.883, 0.935) and cfg.weight_decay == 0.05 and cfg.lr == 5e-4
    assert cfg.mask_ratio == 0.5 and cfg.mask_kind == "perlin" and cfg.clip_grad == 5.0
    assert cfg.size == (512, 512) and cfg.epochs == 300 and cfg.steps is None


def test_size_square_or_hw():
    assert PretrainConfig(data="x", size=96).size == (96, 96)
    assert PretrainConfig(data="x", size=[64, 128]).size == (64, 128)
    assert _parse(["--data", "x", "--size", "64", "96"]).size == (64, 96)
    with pytest.raises(ValueError, match="size"):
        PretrainConfig(data="x", size=[1, 2, 3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(steps=10, epochs=2), "not both"),
    (dict(batch_size=0), "batch_size"),
    (dict(precision="fp8"), "fp8"),
    (dict(lr=1e-4, min_lr=1e-3), "min_lr"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(device="tpu"), "tpu"),
    (dict(mask_kind="checker"), "checker"),
])
def test_invalid_values_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(data="x", **kwargs)


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data: /d\nsize: [64, 96]\nlr: 1.0e-3\nmodel-overrides: {drop_path: 0.0}\n"
                 "steps: 7\nbetas: [0.9, 0.95]\n")
    cfg = _parse(["--config", str(y), "--lr", "2e-3", "--no-progress"])
    assert cfg.data == "/d" and cfg.size == (64, 96) and cfg.steps == 7
    assert cfg.lr == 2e-3, f"flag must override YAML, got lr {cfg.lr}"
    assert cfg.model_overrides == {"drop_path": 0.0} and cfg.betas == (0.9, 0.95)
    assert cfg.progress is False and cfg.epochs is None


def test_saved_yaml_reloads_to_the_same_config(tmp_path):
    cfg = PretrainConfig(data="/d", size=(64, 96), steps=3, model_overrides={"d_s": 0.25})
    save_yaml(cfg, tmp_path / "c.yaml")
    again = _parse(["--config", str(tmp_path / "c.yaml")])
    assert again == cfg, f"{again} != {cfg}"


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("data: /d\nlearning_rate: 1.0\nbatchsize: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['batchsize', 'learning_rate'\]"):
        _parse(["--config", str(y)])


def test_missing_data_says_which_flag():
    with pytest.raises(ValueError, match="--data"):
        _parse(["--steps", "3"])


def test_every_field_has_a_documented_flag():
    import dataclasses

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    helps = {a.dest: a.help for a in parser._actions}
    for f in dataclasses.fields(PretrainConfig):
        assert f.name in helps and len(helps[f.name]) > 15, f"field {f.name} lacks a flag/help"
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "x", "--mask-kind", "checker"])


CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path):
    cfg = _parse(["--config", str(path), "--data", "somewhere"])
    assert cfg.data == "somewhere" and cfg.size[0] % 8 == 0, cfg


def test_example_configs_exist():
    assert len(CONFIGS) >= 2, f"configs/ should hold example YAMLs, found {CONFIGS}"
