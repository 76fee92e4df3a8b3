"""AFF encoder and AFFMAE: shapes, exact token counts, masking isolation, gradients, learning."""

import math
import re

import pytest
import torch

from affmae import create_model
from affmae.layers.merge import num_kept
from affmae.ops.patches import grid_positions
from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens
from affmae.ops.interpolate import FAR, cell_neighbours, lookup_neighbours
from affmae.ops.masking import make_mask, mask_indices


def masks(B, grid_hw, ratio=0.5, kind="perlin", seed=0):
    return make_mask(B, grid_hw, ratio, kind=kind, generator=torch.Generator().manual_seed(seed))


def smooth_images(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, H, W, generator=g)
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2) * 3


@pytest.mark.parametrize("rate", [0.25, 0.37, 0.4, 0.5, 1.0])
def test_merge_keeps_exactly_floor_n_ds_tokens(rate):
    model = create_model("aff_tiny", downsample_rate=rate).eval()
    imgs = smooth_images(2, 96, 128)
    mask = masks(2, (12, 16))
    vis, _ = mask_indices(mask)
    stages = model.encoder.forward_intermediates(imgs, vis)
    counts = [st.x.shape[1] for st in stages]
    want = [vis.shape[1]]
    for _ in range(3):
        want.append(num_kept(want[-1], rate))
    assert counts == want, f"d_s={rate}: token counts {counts}, expected {want}"
    assert want[1] == max(1, math.floor(want[0] * rate))


def test_token_counts_at_512px_match_design():
    model = create_model("aff_tiny").eval()
    mask = masks(1, (64, 64))
    with torch.no_grad():
        stages = model.encoder.forward_intermediates(torch.randn(1, 1, 512, 512),
                                                     mask_indices(mask)[0])
    assert [st.x.shape[1] for st in stages] == [2048, 819, 327, 130]


def test_kept_tokens_keep_their_positions():
    model = create_model("aff_tiny").eval()
    imgs = smooth_images(2, 64, 64)
    vis, _ = mask_indices(masks(2, (8, 8)))
    with torch.no_grad():
        stages = model.encoder.forward_intermediates(imgs, vis)
    for s in range(1, len(stages)):
        prev = {tuple(p) for p in stages[s - 1].pos[0].tolist()}
        assert all(tuple(p) in prev for p in stages[s].pos[0].tolist()), \
            f"stage {s + 1} has positions not present in stage {s}"


def test_masked_pixels_never_reach_the_encoder():
    torch.manual_seed(0)
    model = create_model("aff_tiny").eval()
    imgs = smooth_images(2, 64, 80)
    mask = masks(2, (8, 10))
    vis, _ = mask_indices(mask)
    with torch.no_grad():
        a = model.encoder.forward_intermediates(imgs, vis)
        pixel_mask = mask.view(2, 1, 8, 1, 10, 1).expand(2, 1, 8, 8, 10, 8).reshape(2, 1, 64, 80)
        noisy = torch.where(pixel_mask, torch.randn_like(imgs) * 100, imgs)
        b = model.encoder.forward_intermediates(noisy, vis)
    for s, (sa, sb) in enumerate(zip(a, b)):
        assert torch.equal(sa.x, sb.x), f"stage {s + 1} output changed with masked pixels"
        assert torch.equal(sa.pos, sb.pos)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (56, 40)])
def test_mae_forward_backward_finite_every_parameter(hw):
    torch.manual_seed(0)
    model = create_model("aff_tiny", drop_path=0.1)
    H, W = hw
    imgs = smooth_images(2, H, W)
    mask = masks(2, (H // 8, W // 8))
    out = model(imgs, mask)
    Nm = int(mask[0].sum())
    assert out["pred"].shape == (2, Nm, 64)
    assert set(out) >= {"loss", "loss_rec", "loss_ds3", "loss_ds4", "pred"}
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None
           and not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without gradient: {missing}"
    assert not bad, f"non-finite gradients: {bad}"


def test_importance_score_gets_gradient_through_merge_weights():
    model = create_model("aff_tiny")
    imgs = smooth_images(2, 64, 64)
    model(imgs, masks(2, (8, 8)))["loss"].backward()
    for s, merge in enumerate(model.encoder.merges):
        g = merge.score.weight.grad
        assert g is not None and g.abs().sum() > 0, f"merge {s + 1} importance has no gradient"


def test_zero_aux_weights_really_switch_deep_supervision_off():
    model = create_model("aff_tiny", aux_weights=(0.0, 0.0))
    assert len(model.aux_heads) == 0, "heads exist although their weights are 0"
    out = model(smooth_images(1, 64, 64), masks(1, (8, 8)))
    assert "loss_ds3" not in out and "loss_ds4" not in out
    assert torch.equal(out["loss"], out["loss_rec"])
    one = create_model("aff_tiny", aux_weights=(0.0, 0.3))
    assert list(one.aux_heads) == ["3"]


def test_aux_weights_enter_the_loss():
    torch.manual_seed(0)
    model = create_model("aff_tiny", aux_weights=(0.05, 0.12)).eval()
    out = model(smooth_images(1, 64, 64), masks(1, (8, 8)))
    want = out["loss_rec"] + 0.12 * out["loss_ds3"] + 0.05 * out["loss_ds4"]
    torch.testing.assert_close(out["loss"], want)


def test_pred_ratio_queries_an_exact_subset():
    model = create_model("aff_tiny", pred_ratio=0.25).train()
    mask = masks(2, (8, 8))
    out = model(smooth_images(2, 64, 64), mask)
    Nm = int(mask[0].sum())
    q = out["pred_idx"]
    assert q.shape == (2, round(0.25 * Nm))
    assert torch.all(torch.gather(mask, 1, q)), "a query is not a masked patch"
    model.eval()
    assert model(smooth_images(2, 64, 64), mask)["pred"].shape[1] == Nm, "eval must query all"


def test_reconstruct_keeps_visible_patches():
    model = create_model("aff_tiny").eval()
    imgs = smooth_images(2, 64, 64)
    mask = masks(2, (8, 8))
    rec = model.reconstruct(imgs, mask)
    pix = mask.view(2, 1, 8, 1, 8, 1).expand(2, 1, 8, 8, 8, 8).reshape(2, 1, 64, 64)
    assert torch.equal(rec[~pix], imgs[~pix]), "visible pixels were altered"
    assert not torch.equal(rec[pix], imgs[pix])


def test_unmasked_encoder_and_awkward_sizes():
    model = create_model("aff_tiny").eval()
    for H, W in [(56, 56), (80, 64), (40, 128)]:
        with torch.no_grad():
            stages = model.encoder.forward_intermediates(smooth_images(1, H, W))
        assert stages[0].x.shape[1] == (H // 8) * (W // 8)
        assert all(torch.isfinite(s.x).all() for s in stages)


def test_bad_sizes_are_rejected():
    model = create_model("aff_tiny")
    with pytest.raises(ValueError, match="multiple of the patch"):
        model.encoder.forward_intermediates(torch.randn(1, 1, 60, 64))
    with pytest.raises(ValueError, match="is_masked"):
        model(torch.randn(1, 1, 64, 64), torch.zeros(1, 63, dtype=torch.bool))
    with pytest.raises(TypeError, match="no field"):
        create_model("aff_tiny", downsample_ratee=0.3)


def test_aff_small_has_about_22m_parameters():
    model = create_model("aff_small")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 22e6) / 22e6 < 0.10, f"aff_small has {n / 1e6:.2f}M parameters, want ~22M"


@pytest.mark.parametrize("gh,gw,nk", [(32, 32, 300), (64, 64, 2048), (64, 64, 130), (40, 72, 900)])
def test_cell_neighbour_table_is_the_true_knn(gh, gw, nk):
    """Cluster-bounded K-nearest table of every cell equals a brute-force scan."""
    g = torch.Generator().manual_seed(0)
    cells = grid_positions(torch.arange(gh * gw)[None], gw)[0]
    keys = cells[torch.randperm(gh * gw, generator=g)[:nk]][None]
    kcl = balanced_clustering(keys, (gh, gw))
    kpos = pad_tokens(gather_tokens(keys, kcl.perm), kcl.n_padded)
    kpos[:, kcl.n_valid:] = FAR
    table = cell_neighbours(kcl, kpos, (gh, gw), 4, 12)[0]  # the decoder's default bound
    d_sel = (kpos[0][table] - cells[:, None]).norm(dim=-1)
    d_all = torch.cdist(cells, kpos[0, :kcl.n_valid],
                        compute_mode="donot_use_mm_for_euclid_dist").topk(4, largest=False).values
    agree = torch.isclose(d_sel, d_all, atol=1e-5).all(-1).float().mean().item()
    assert agree == 1.0, f"only {agree:.4f} of cells got their true 4 nearest tokens"
    pts = cells[None, :, None] + torch.rand(1, gh * gw, 3, 2, generator=g) - 0.5
    looked = lookup_neighbours(pts, table[None], (gh, gw))[0]
    assert torch.equal(looked, table[:, None].expand(-1, 3, -1)), "points read a foreign cell"


def test_tiny_mae_overfits_four_images():
    torch.manual_seed(0)
    model = create_model("aff_tiny")
    imgs = smooth_images(4, 64, 64)
    mask = masks(4, (8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        out = model(imgs, mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss_rec"].item())
    assert losses[-1] < losses[0] / 5, f"loss went {losses[0]:.4f} -> {losses[-1]:.4f}"


def _loss_and_grads(mode: str, imgs, mask):
    torch.manual_seed(0)
    model = create_model("aff_tiny", drop_path=0.2, grad_checkpoint=mode).train()
    torch.manual_seed(1)  # the same drop-path draws in every mode
    loss = model(imgs, mask)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["encoder", "decoder", "all"])
def test_grad_checkpoint_gives_the_same_loss_and_gradients_and_saves_less(mode):
    from affmae.bench.memory import saved_activation_bytes

    imgs = smooth_images(2, 64, 64)
    mask = masks(2, (8, 8))
    ref_loss, ref_grads = _loss_and_grads("none", imgs, mask)
    loss, grads = _loss_and_grads(mode, imgs, mask)
    # Recomputation replays the same ops on the same inputs (drop-path RNG state restored).
    assert torch.equal(loss, ref_loss), (mode, loss.item(), ref_loss.item())
    worst = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    assert worst <= 1e-6, f"{mode}: largest gradient difference {worst:.3g}"

    def saved(m: str) -> int:
        torch.manual_seed(0)
        model = create_model("aff_tiny", drop_path=0.2, grad_checkpoint=m).train()
        return saved_activation_bytes(model, lambda: model(imgs, mask)["loss"]).total

    # aff_tiny (measured): none 3.05 MB, encoder 2.51, decoder 1.21, all 0.68 saved. Inputs a
    # checkpointed block keeps for its recomputation are not autograd-saved and not counted.
    full, ckpt = saved("none"), saved(mode)
    bound = {"encoder": 0.9, "decoder": 0.5, "all": 0.3}[mode]
    assert ckpt < bound * full, f"{mode}: saved {ckpt} B vs {full} B without checkpointing"


def test_grad_checkpoint_is_validated():
    with pytest.raises(ValueError, match=re.escape("grad_checkpoint must be one of none|encoder|")):
        create_model("aff_tiny", grad_checkpoint="decoders")


def test_deformable_attention_is_the_per_point_form():
    """The decoder mixes its Pt points inside one weighted gather over Pt*K (point, neighbour)
    pairs; that must equal interpolating each point, then the softmax-weighted sum of points."""
    from affmae.layers.decoder import DeformableAttention
    from affmae.ops.interpolate import gather_weighted, interpolation_weights

    torch.manual_seed(0)
    B, Nq, C, H, Pt, K, gh, gw = 2, 24, 32, 2, 3, 4, 8, 8
    att = DeformableAttention(C, H, Pt, K).double()
    for p in att.parameters():  # non-trivial offsets, logits and temperatures
        torch.nn.init.normal_(p, std=0.3)
    qpos = torch.rand(B, Nq, 2, dtype=torch.float64) * 7
    src_idx = torch.stack([torch.randperm(gh * gw)[:40] for _ in range(B)])
    src_pos = grid_positions(src_idx, gw).double()
    cl = balanced_clustering(src_pos, (gh, gw), 8, 4)
    spos = pad_tokens(gather_tokens(src_pos, cl.perm), cl.n_padded)
    table = cell_neighbours(cl, spos, (gh, gw), K, 4)
    src = torch.randn(B, spos.shape[1], C, dtype=torch.float64)
    xq = torch.randn(B, Nq, C, dtype=torch.float64)
    got = att(xq, qpos, src, spos, table, (gh, gw), 1.5)

    off_w, logit_w = att.in_proj.weight.split([H * Pt * 2, H * Pt])
    off_b, logit_b = att.in_proj.bias.split([H * Pt * 2, H * Pt])
    off = torch.nn.functional.linear(xq, off_w, off_b).view(B, Nq, H, Pt, 2) * 1.5
    points = qpos[:, :, None, None, :] + off
    sel = lookup_neighbours(points.view(B, Nq, H * Pt, 2), table, (gh, gw)).view(B, Nq, H, Pt, K)
    w = interpolation_weights(points / 1.5, sel, spos / 1.5, att.log_temp.exp()).double()
    v = gather_weighted(att.value(src).view(B, -1, H, C // H), sel, w)  # (B, Nq, H, Pt, Dh)
    a = torch.softmax(torch.nn.functional.linear(xq, logit_w, logit_b).view(B, Nq, H, Pt), dim=-1)
    want = att.proj(torch.einsum("bnhp,bnhpd->bnhd", a, v).reshape(B, Nq, C))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("self_attention", [True, False])
def test_deformable_attention_loads_separate_projections(self_attention):
    """Checkpoints from before ``in_proj`` (separate value / offsets / attn_logits Linears) load
    into the fused projection and compute the same function."""
    from affmae.layers.decoder import DeformableAttention

    torch.manual_seed(0)
    C, H, Pt = 16, 2, 3
    att = DeformableAttention(C, H, Pt, 4, self_attention=self_attention)
    sd = att.state_dict()
    w, b = sd.pop("in_proj.weight"), sd.pop("in_proj.bias")
    names = (["value"] if self_attention else []) + ["offsets", "attn_logits"]
    sizes = ([C] if self_attention else []) + [H * Pt * 2, H * Pt]
    for n, wi, bi in zip(names, w.split(sizes), b.split(sizes)):
        sd[f"{n}.weight"], sd[f"{n}.bias"] = wi.clone(), bi.clone()
    if not self_attention:
        sd["value.weight"], sd["value.bias"] = att.value.weight, att.value.bias
    other = DeformableAttention(C, H, Pt, 4, self_attention=self_attention)
    other.load_state_dict(sd)  # strict: every key used, none missing
    for k, v in att.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


@pytest.mark.parametrize("C", [8, 96, 160])  # one group, one group of 96, two groups of 80
def test_merge_sums_is_the_gathered_einsum(C):
    from affmae.layers.merge import merge_sums

    torch.manual_seed(0)
    B, Np, k, K, J = 2, 30, 7, 16, 4
    x = torch.randn(B, Np, C, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(0, Np, (B, k, K))
    w = torch.randn(B, k, K, J, dtype=torch.float64, requires_grad=True)
    got = merge_sums(x, slots, w)
    x_n = torch.gather(x, 1, slots.reshape(B, -1, 1).expand(-1, -1, C)).view(B, k, K, C)
    want = torch.einsum("bnkj,bnkc->bnjc", w, x_n).reshape(B, k, J * C)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    assert torch.autograd.gradcheck(lambda a, b: merge_sums(a, slots, b), (x, w), fast_mode=True)
    ga = torch.autograd.grad(got, (x, w), g)
    gb = torch.autograd.grad(want, (x, w), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_narrow_layer_norm_is_layer_norm():
    from affmae.layers.merge import NarrowLayerNorm

    torch.manual_seed(0)
    ln, ref = NarrowLayerNorm(4), torch.nn.LayerNorm(4)
    for p, q in zip(ln.parameters(), ref.parameters()):
        torch.nn.init.normal_(p)
        q.data.copy_(p.data)
    x = torch.randn(50, 7, 4) * 3 + 1
    torch.testing.assert_close(ln(x), ref(x))
    g = torch.randn(50, 7, 4)
    ga = torch.autograd.grad(ln(x), list(ln.parameters()), g)
    gb = torch.autograd.grad(ref(x), list(ref.parameters()), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    assert set(ln.state_dict()) == set(ref.state_dict())


def test_sincos_embedding_is_the_four_quarter_formula():
    """sin x, cos x, sin y, cos y over frequencies 1 / 10000^(i / quarter), bitwise the plain
    formula (the frequencies are a cached table)."""
    from affmae.layers.common import sincos_embed_2d

    pos = torch.rand(2, 7, 2) * 60
    for dim in (8, 96, 384):
        q = dim // 4
        omega = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float32) / q))
        x, y = pos[..., 0:1] * omega, pos[..., 1:2] * omega
        want = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)
        assert torch.equal(sincos_embed_2d(pos, dim), want), dim
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_embed_2d(pos, 10)


def test_far_padding_pads_and_moves_padding_far():
    from affmae.layers.decoder import FAR, far_padding

    pos = torch.rand(2, 13, 2) * 9
    got = far_padding(pos, 13, 16)  # pad 13 real positions to 16 slots
    assert got.shape == (2, 16, 2) and torch.equal(got[:, :13], pos)
    assert bool((got[:, 13:] == FAR).all())
    assert torch.equal(far_padding(got, 13), got)  # already padded: the same values
    assert far_padding(pos, 13) is pos  # nothing to move
