"""affmae.bench.attention on CPU: the stage sizes it documents, its byte count and its options
(the measurements themselves need a GPU: docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from affmae.bench import attention


def test_stage_tokens_match_the_documented_sizes():
    assert attention.stage_tokens(512) == [2048, 819, 327, 130]
    assert attention.stage_tokens(768) == [4608, 1843, 737, 294]


def test_min_bytes_counts_each_tensor_once():
    import torch

    s = dict(B=2, N=16, H=3, D=8, M=2, Kc=2, nbr=torch.zeros(2, 2, 2, dtype=torch.int64))
    tensor = 2 * 16 * 3 * 8 * 2  # one bf16 (B, N, H, D) tensor
    small = 2 * 16 * 2 * 4 + 2 * 2 * 2 * 8  # float32 positions, int64 neighbour lists
    lse = 2 * 3 * 16 * 4
    assert attention.min_bytes(s, 2) == (4 * tensor + small + lse, 7 * tensor + small + lse)


def test_backward_thread_is_checked():
    with pytest.raises(ValueError, match="backward_thread"):
        attention.run([512], 1, "bf16", ["torch"], False, log=print, backward_thread="gpu")
    with pytest.raises(SystemExit):
        attention.main(["--backward-thread", "gpu"])
