"""Where a benchmark's numbers came from: the commit of the sources that produced them."""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout holding ``where`` (default: this package), with "-dirty" when
    the sources differ from it (a copied or edited checkout); None outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=where or Path(__file__).parent, capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
