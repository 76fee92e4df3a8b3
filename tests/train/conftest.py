"""Shared fixtures for the training tests: small synthetic image folders (64-80 px)."""

from __future__ import annotations

from pathlib import Path

import pytest

from affmae.data.synthetic import write_dataset


@pytest.fixture(scope="session")
def images64(tmp_path_factory) -> Path:
    """16 synthetic EM-like 64 x 64 PNGs (plus masks, unused here); returns the images folder."""
    return write_dataset(tmp_path_factory.mktemp("syn64"), 16, (64, 64), seed=0) / "images"


@pytest.fixture(scope="session")
def images80(tmp_path_factory) -> Path:
    """8 synthetic 80 x 80 PNGs, larger than the 64 px training size (for random crops)."""
    return write_dataset(tmp_path_factory.mktemp("syn80"), 8, (80, 80), seed=1) / "images"
