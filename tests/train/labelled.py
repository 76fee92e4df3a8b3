"""Synthetic labelled folders for the fine-tuning and prediction tests."""

from __future__ import annotations

import numpy as np
import yaml
from PIL import Image

from affmae.data.synthetic import write_dataset

VALUES = (0, 100, 200)  # mask values on disk (not 0..C-1, to exercise the class map)
NAMES = ("cyto", "mem", "mito")


def write_labelled(root, n, size, seed):
    """Synthetic pairs with mask values VALUES (not 0..C-1) and a matching classes.yaml."""
    write_dataset(root, n, size, seed=seed)
    lut = np.asarray(VALUES, dtype=np.uint8)
    for f in sorted((root / "masks").glob("*.png")):
        Image.fromarray(lut[np.asarray(Image.open(f))]).save(f)
    (root / "classes.yaml").write_text(yaml.safe_dump(dict(zip(VALUES, NAMES))))
    return root
