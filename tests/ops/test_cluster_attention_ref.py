"""Reference cluster attention against a naive dense-softmax computation (float64)."""

import math

import pytest
import torch

from affmae.ops.cluster_attention import cluster_attention
from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens


def make_inputs(B=2, gh=12, gw=11, keep=101, H=2, D=8, m=8, Kc=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    cells = torch.stack([xs, ys], -1).reshape(-1, 2).float()
    pos = torch.stack([cells[torch.randperm(gh * gw, generator=g)[:keep]] for _ in range(B)])
    cl = balanced_clustering(pos, (gh, gw), m=m, num_nbr_clusters=Kc)
    Np = cl.n_padded
    pos_c = pad_tokens(gather_tokens(pos, cl.perm), Np)
    q, k, v = (torch.randn(B, Np, H, D, generator=g, dtype=dtype) for _ in range(3))
    w, b = torch.randn(H, 5, generator=g, dtype=dtype) * 0.3, torch.randn(H, generator=g, dtype=dtype)
    bk, bv = torch.randn(H, D, generator=g, dtype=dtype), torch.randn(H, D, generator=g, dtype=dtype)
    return dict(q=q, k=k, v=v, pos=pos_c, nbr=cl.nbr, n_valid=cl.n_valid, bias_weight=w,
                bias_bias=b, blank_k=bk, blank_v=bv), m


def naive(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, m):
    """Per query, per head: explicit loop over its allowed keys."""
    B, N, H, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(n_valid):
            keys = [j for c in nbr[b, i // m].tolist() for j in range(c * m, c * m + m)
                    if j < n_valid]
            for h in range(H):
                logits = []
                for j in keys:
                    dx, dy = (pos[b, j] - pos[b, i]).tolist()
                    r = math.hypot(dx, dy)
                    f = torch.tensor([dx, dy, r, dx / r if r else 0.0, dy / r if r else 0.0],
                                     dtype=q.dtype)
                    logits.append(q[b, i, h] @ k[b, j, h] / math.sqrt(D)
                                  + f @ bias_weight[h] + bias_bias[h])
                logits.append(q[b, i, h] @ blank_k[h] / math.sqrt(D))
                p = torch.softmax(torch.stack(logits), 0)
                vals = torch.stack([v[b, j, h] for j in keys] + [blank_v[h]])
                out[b, i, h] = p @ vals
    return out


def test_reference_equals_naive_dense_softmax():
    args, m = make_inputs()
    got = cluster_attention(**args, backend="torch")
    want = naive(**args, m=m)
    n = args["n_valid"]
    err = (got[:, :n] - want[:, :n]).abs().max().item()
    assert err < 1e-10, f"reference differs from the naive computation by {err:.3e}"


def test_padding_is_never_attended():
    args, m = make_inputs(keep=97)
    n = args["n_valid"]
    base = cluster_attention(**args, backend="torch")
    args["k"][:, n:] = 1e4
    args["v"][:, n:] = 1e6  # padding holds finite copies of a real token (pad_tokens)
    moved = cluster_attention(**args, backend="torch")
    assert torch.equal(base[:, :n], moved[:, :n]), "padded keys changed real outputs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_stay_finite(dtype):
    args, _ = make_inputs(dtype=torch.float32)
    for key in ("q", "k", "v", "blank_k", "blank_v"):
        args[key] = args[key].to(dtype)
    args["q"] = args["q"] * 300
    out = cluster_attention(**args, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all(), "non-finite output with large logits"


def test_unknown_backend_is_rejected():
    args, _ = make_inputs()
    with pytest.raises(ValueError, match="backend"):
        cluster_attention(**args, backend="cuda")
