"""Cluster attention, PyTorch reference: the specification of the op and its CPU path.

For each cluster c (m queries) with neighbour clusters nbr[c] (K = Kc * m keys), per head:

    out_q = softmax([q.k_j * scale + bias(p_k_j - p_q) for j in nbr keys] ++ [q.blank_k * scale])
            @ [v_j ...] ++ [blank_v]

bias(d) = relpos_features(d) @ bias_weight.T + bias_bias (Linear(5 -> H)); the blank key carries
no bias. Keys in padded slots (index >= n_valid) get a large negative logit; the blank key is
always present, so no row is empty and nothing is NaN. Logits, bias and softmax are float32
(float64 for float64 inputs); the two matrix products run in the input dtype (as any
half-precision attention does).
"""

from __future__ import annotations

import torch

from affmae.ops.relpos import relpos_features

MASKED_LOGIT = -1.0e30


def gather_clusters(x: torch.Tensor, nbr: torch.Tensor, m: int) -> torch.Tensor:
    """x: (B, M*m, *F) clustered tokens, nbr: (B, M, Kc) -> (B, M, Kc*m, *F) neighbour tokens."""
    B, Np = x.shape[:2]
    feat = x.shape[2:]
    M, Kc = nbr.shape[1:]
    xc = x.reshape(B, Np // m, -1)  # (B, M, m*F)
    idx = nbr.reshape(B, M * Kc, 1).expand(-1, -1, xc.shape[-1])
    g = torch.gather(xc, 1, idx)  # (B, M*Kc, m*F)
    return g.reshape(B, M, Kc * m, *feat)


def cluster_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    nbr: torch.Tensor,
    n_valid: int,
    bias_weight: torch.Tensor,
    bias_bias: torch.Tensor,
    blank_k: torch.Tensor,
    blank_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference cluster attention.

    Args:
        q, k, v: (B, N, H, D) tokens in clustered order, N = M * m (slots >= n_valid are padding).
        pos: (B, N, 2) float positions of the clustered tokens.
        nbr: (B, M, Kc) int64 neighbour clusters of each cluster.
        n_valid: number of real tokens; slots >= n_valid are never attended.
        bias_weight: (H, 5), bias_bias: (H,) relative-position bias Linear(5 -> H).
        blank_k, blank_v: (H, D) learned blank key and value.
        scale: logit scale, default D ** -0.5.
    Returns:
        (B, N, H, D) in the dtype of q.
    """
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    if N % M != 0:
        raise ValueError(f"token count N={N} is not a multiple of the cluster count M={M}")
    m = N // M
    scale = D**-0.5 if scale is None else scale

    qc = q.reshape(B, M, m, H, D)  # (B, M, m, H, D)
    kg = gather_clusters(k, nbr, m)  # (B, M, K, H, D)
    vg = gather_clusters(v, nbr, m)  # (B, M, K, H, D)
    pq = pos.reshape(B, M, m, 2)  # (B, M, m, 2)
    pk = gather_clusters(pos, nbr, m)  # (B, M, K, 2)
    slot = torch.arange(N, device=q.device).view(1, N).expand(B, N)
    valid_k = gather_clusters(slot, nbr, m) < n_valid  # (B, M, K)

    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for checks
    logits = torch.einsum("bmqhd,bmkhd->bmhqk", qc, kg).to(acc) * scale  # (B, M, H, m, K)
    rel = relpos_features((pk[:, :, None] - pq[:, :, :, None]).to(acc))  # (B, M, m, K, 5)
    bias = rel @ bias_weight.to(acc).t() + bias_bias.to(acc)  # (B, M, m, K, H)
    logits = logits + bias.permute(0, 1, 4, 2, 3)
    logits = logits.masked_fill(~valid_k[:, :, None, None, :], MASKED_LOGIT)
    blank = torch.einsum("bmqhd,hd->bmhq", qc, blank_k.to(q.dtype)).to(acc) * scale  # (B, M, H, m)
    attn = torch.softmax(torch.cat([logits, blank[..., None]], dim=-1), dim=-1)  # (B, M, H, m, K+1)

    a = attn[..., :-1].to(v.dtype)
    out = torch.einsum("bmhqk,bmkhd->bmqhd", a, vg)  # (B, M, m, H, D)
    out = out + (attn[..., -1:].permute(0, 1, 3, 2, 4) * blank_v.to(acc)).to(out.dtype)
    return out.reshape(B, N, H, D)
