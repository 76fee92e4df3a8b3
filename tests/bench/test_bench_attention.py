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


def test_dense_window_yardstick_is_attention_within_windows():
    """The sdpa_* rows: each window of Kc * m tokens attends to itself alone, gradients flow to
    q, k, v, and its byte count is min_bytes' without positions and neighbour lists."""
    import torch

    s = dict(B=2, N=40, H=2, D=8, m=4, Kc=4, q=torch.zeros(2, 40, 2, 8, dtype=torch.float64))
    w = attention.window_stage(s)
    assert (w["W"], w["N"]) == (16, 32)  # the first 16 * floor(40 / 16) tokens
    q, k, v = (t.detach().clone().requires_grad_() for t in (w["q"], w["k"], w["v"]))
    out = attention.sdpa_impl(w, None)(q, k, v)
    assert out.shape == (2, 32, 2, 8)
    for i in range(2):  # window i: tokens 16 i .. 16 i + 15, per head
        sl = slice(16 * i, 16 * i + 16)
        qs, ks, vs = (t[:, sl].transpose(1, 2) for t in (q, k, v))  # (B, H, 16, D)
        ref = torch.softmax(qs @ ks.transpose(-1, -2) / 8**0.5, -1) @ vs
        torch.testing.assert_close(out[:, sl], ref.transpose(1, 2))
    out.backward(w["do"])
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    tensor = 2 * 32 * 2 * 8 * 2
    assert attention.window_bytes(2, 32, 2, 8, 2) == (4 * tensor + 2 * 2 * 32 * 4, 7 * tensor + 2 * 2 * 32 * 4)
    with pytest.raises(ValueError, match="no full window"):
        attention.window_stage(dict(s, N=8))
