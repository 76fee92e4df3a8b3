"""ViT-MAE and ViT-CrossMAE baselines: shapes, gradients, masking, query independence, pred_ratio."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from affmae import create_model
from affmae.models.vit import ViTMAEConfig
from affmae.ops.masking import sample_queries
from affmae.ops.masking import make_mask, mask_indices

VIT_NAMES = ("vit_tiny", "vit_tiny_crossmae")


def _batch(B=2, H=64, W=96, ratio=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(B, 1, H, W, generator=g)
    is_masked = make_mask(B, (H // 8, W // 8), ratio, generator=g)
    return imgs, is_masked


@pytest.mark.parametrize("name", VIT_NAMES)
@pytest.mark.parametrize("hw", [(64, 96), (40, 72), (64, 64)])
def test_forward_backward_shapes_finite(name, hw):
    torch.manual_seed(0)
    model = create_model(name)
    imgs, is_masked = _batch(H=hw[0], W=hw[1])
    out = model(imgs, is_masked)
    nm = int(is_masked[0].sum())
    nq = nm if model.config.pred_ratio == 1.0 else round(model.config.pred_ratio * nm)
    assert out["pred"].shape == (2, nq, 64), f"pred shape {tuple(out['pred'].shape)}, Nq={nq}"
    assert out["pred_idx"].shape == (2, nq)
    assert bool(is_masked.gather(1, out["pred_idx"]).all()), "a predicted patch is not masked"
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0, f"loss {out['loss']}"
    assert torch.equal(out["loss"], out["loss_rec"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    rec = model.reconstruct(imgs, is_masked)
    assert rec.shape == imgs.shape
    vis = ~is_masked.view(2, 1, hw[0] // 8, 1, hw[1] // 8, 1).expand(2, 1, hw[0] // 8, 8, hw[1] // 8, 8)
    vis = vis.reshape(2, 1, *hw)
    assert torch.equal(rec[vis], imgs[vis]), "reconstruct changed visible pixels"


def test_bad_image_size_and_mask_shape_raise():
    model = create_model("vit_tiny")
    imgs, is_masked = _batch(H=64, W=64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(2, 1, 60, 64), is_masked)
    with pytest.raises(ValueError, match="is_masked has shape"):
        model(torch.randn(2, 1, 64, 72), is_masked)


def test_masked_pixels_do_not_reach_encoder():
    torch.manual_seed(0)
    model = create_model("vit_tiny").eval()
    imgs, is_masked = _batch()
    x0, vis0, _ = model.forward_encoder(imgs, is_masked)
    pix_masked = is_masked.view(2, 1, 8, 1, 12, 1).expand(2, 1, 8, 8, 12, 8).reshape(2, 1, 64, 96)
    noisy = torch.where(pix_masked, torch.randn_like(imgs) * 100.0, imgs)
    x1, vis1, _ = model.forward_encoder(noisy, is_masked)
    assert torch.equal(vis0, vis1)
    assert torch.equal(x0, x1), f"encoder output moved by {(x0 - x1).abs().max():.3g}"
    # and the check can fail: changing a visible pixel does change the output
    x2, _, _ = model.forward_encoder(torch.where(pix_masked, imgs, imgs + 1.0), is_masked)
    assert not torch.allclose(x0, x2)


def test_forward_features_match_unmasked_encoder():
    torch.manual_seed(0)
    model = create_model("vit_tiny").eval()
    imgs, _ = _batch(H=40, W=72)
    none_masked = torch.zeros(2, 5 * 9, dtype=torch.bool)
    x, _, _ = model.forward_encoder(imgs, none_masked)
    feats = model.forward_features(imgs)
    assert feats.shape == (2, 45, 64)
    torch.testing.assert_close(feats, x)
    inter = model.forward_intermediates(imgs, output_fmt="NCHW")
    assert [t.shape for t in inter] == [(2, 64, 5, 9)] * 2, [tuple(t.shape) for t in inter]
    last = model.forward_intermediates(imgs, indices=(-1,))[0]
    torch.testing.assert_close(last, feats)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(imgs, indices=(5,))


def _decode(model, imgs, is_masked, query_idx):
    x, vis, _ = model.forward_encoder(imgs, is_masked)
    return model.forward_decoder(x, vis, query_idx, (imgs.shape[-2] // 8, imgs.shape[-1] // 8))


def test_crossmae_queries_are_independent():
    """Moving one query and dropping another leaves every other prediction unchanged."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_crossmae").eval()
    imgs, is_masked = _batch(B=1)
    _, masked = mask_indices(is_masked)
    q = masked[:, :10]
    moved = q.clone()
    moved[0, 3] = masked[0, 20]  # query 3 goes to another masked patch
    moved = moved[:, [i for i in range(10) if i != 7]]  # query 7 is dropped
    with torch.no_grad():
        a = _decode(model, imgs, is_masked, q)[0]  # (10, P*P)
        b = _decode(model, imgs, is_masked, moved)[0]  # (9, P*P)
    others = [i for i in range(10) if i not in (3, 7)]
    b_others = b[[i if i < 7 else i - 1 for i in others]]
    diff = (a[others] - b_others).abs().max().item()
    assert diff < 1e-5, f"other predictions changed by {diff:.3g}"
    moved_diff = (a[3] - b[3]).abs().max().item()
    assert moved_diff > 1e-4, f"the moved query's own prediction did not change ({moved_diff:.3g})"


def test_crossmae_query_depends_on_encoder_tokens():
    torch.manual_seed(0)
    model = create_model("vit_tiny_crossmae").eval()
    imgs, is_masked = _batch(B=1)
    _, masked = mask_indices(is_masked)
    pix_vis = (~is_masked).view(1, 1, 8, 1, 12, 1).expand(1, 1, 8, 8, 12, 8).reshape(1, 1, 64, 96)
    with torch.no_grad():
        a = _decode(model, imgs, is_masked, masked)
        b = _decode(model, torch.where(pix_vis, imgs + 1.0, imgs), is_masked, masked)
    assert (a - b).abs().max() > 1e-3, "CrossMAE predictions ignore the visible patches"


def test_pred_ratio_one_equals_full_loss_and_subset_matches():
    torch.manual_seed(0)
    sub = create_model("vit_tiny_crossmae", pred_ratio=0.3).train()
    full = create_model("vit_tiny_crossmae", pred_ratio=1.0).train()
    full.load_state_dict(sub.state_dict())
    imgs, is_masked = _batch()
    _, masked = mask_indices(is_masked)
    out_full = full(imgs, is_masked)
    assert torch.equal(out_full["pred_idx"], masked), "pred_ratio=1 must predict every masked patch"
    target = full._target(imgs, masked)
    manual = F.mse_loss(out_full["pred"], target)
    torch.testing.assert_close(out_full["loss"], manual, rtol=0, atol=0)
    eval_loss = sub.eval()(imgs, is_masked)["loss"]
    torch.testing.assert_close(out_full["loss"], eval_loss, rtol=1e-6, atol=1e-7)

    sub.train()
    g = torch.Generator().manual_seed(3)
    out_sub = sub(imgs, is_masked, generator=g)
    k = round(0.3 * masked.shape[1])
    idx = out_sub["pred_idx"]
    assert idx.shape == (2, k), f"expected {k} predicted patches, got {tuple(idx.shape)}"
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "predicted patches not ascending"
    pos = torch.searchsorted(masked, idx)  # rows of the full prediction
    ref = out_full["pred"].gather(1, pos.unsqueeze(-1).expand(-1, -1, 64))
    torch.testing.assert_close(out_sub["pred"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_sub["loss"], F.mse_loss(ref, sub._target(imgs, idx)),
                               rtol=1e-5, atol=1e-6)
    again = sub(imgs, is_masked, generator=torch.Generator().manual_seed(3))["pred_idx"]
    assert torch.equal(again, idx), "the same generator seed must pick the same patches"


def test_sample_queries_exact_count_subset():
    masked = torch.sort(torch.randperm(100)[:40]).values.expand(3, -1).contiguous()
    for ratio, k in ((0.25, 10), (0.5, 20), (0.01, 1), (1.0, 40)):
        s = sample_queries(masked, ratio, torch.Generator().manual_seed(0))
        assert s.shape == (3, k), f"ratio {ratio}: shape {tuple(s.shape)}, expected (3, {k})"
        assert bool(torch.isin(s, masked[0]).all())
        assert all(len(set(r.tolist())) == k for r in s), "duplicate patches in the subset"
    with pytest.raises(ValueError, match="pred_ratio"):
        sample_queries(masked, 0.0)


def test_norm_pix_loss_changes_target():
    torch.manual_seed(0)
    a = create_model("vit_tiny")
    b = create_model("vit_tiny", norm_pix_loss=True)
    b.load_state_dict(a.state_dict())
    imgs, is_masked = _batch()
    imgs = imgs * 3.0 + 5.0
    la, lb = a(imgs, is_masked)["loss"], b(imgs, is_masked)["loss"]
    assert la > 10 * lb, f"per-patch normalised target should remove the offset: {la} vs {lb}"


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="needs decoder='cross'"):
        ViTMAEConfig(pred_ratio=0.5)
    with pytest.raises(ValueError, match="pred_ratio"):
        ViTMAEConfig(decoder="cross", pred_ratio=1.5)
    with pytest.raises(ValueError, match="not divisible"):
        ViTMAEConfig(embed_dim=384, num_heads=5)
    with pytest.raises(ValueError, match="decoder must be"):
        ViTMAEConfig(decoder="self")
    with pytest.raises(TypeError, match="no field"):
        create_model("vit_tiny", embed_dims=32)
    m = create_model("vit_tiny", depth=3)
    assert m.config.depth == 3 and len(m.encoder.blocks) == 3
    assert dataclasses.asdict(m.config)["decoder"] == "mae"
    assert m.patch_size == 8
    names = {n for n, _ in m.named_parameters()}
    assert m.no_weight_decay() <= names, f"unknown names {m.no_weight_decay() - names}"


def test_vit_small_parameter_count():
    model = create_model("vit_small")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 21.5e6) / 21.5e6 < 0.10, f"vit_small has {n / 1e6:.3f}M parameters, expected ~21.5M"
    enc = sum(p.numel() for p in model.encoder.parameters())
    assert abs(enc - 14.2e6) / 14.2e6 < 0.05, f"ViT-S/8 encoder has {enc / 1e6:.3f}M parameters"


def test_tiny_mae_overfits():
    torch.manual_seed(0)
    model = create_model("vit_tiny_crossmae").train()
    imgs, is_masked = _batch(B=2, H=32, W=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(imgs, is_masked)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    last = model(imgs, is_masked)["loss"].item()
    assert last < 0.5 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", VIT_NAMES)
def test_segmenter_on_vit_backbone(name):
    torch.manual_seed(0)
    seg = create_model("segmenter", backbone=name, num_classes=3)
    imgs = torch.randn(2, 1, 40, 56)
    logits = seg(imgs)
    assert logits.shape == (2, 3, 40, 56), tuple(logits.shape)
    logits.square().mean().backward()
    bad = [n for n, p in seg.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters without finite gradient: {bad}"
    assert not any("decoder.head" in n for n, _ in seg.named_parameters()), "pixel head kept"
    L = seg.num_layers
    ids = {n: seg.layer_id(n) for n, _ in seg.named_parameters()}
    assert ids["backbone.encoder.patch_embed.weight"] == 0
    assert ids["backbone.encoder.blocks.1.mlp.fc1.weight"] == 2
    assert all(0 <= i <= L + 1 for i in ids.values()), ids
    assert max(ids.values()) == L + 1 and ids["head.1.weight"] == L + 1


@pytest.mark.parametrize("name", ["vit_tiny", "vit_tiny_crossmae"])
@pytest.mark.parametrize("mode", ["encoder", "decoder", "all"])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(name, mode):
    imgs, mask = _batch()

    def run(m):
        torch.manual_seed(0)
        model = create_model(name, drop_path=0.2, grad_checkpoint=m).train()
        torch.manual_seed(1)  # same drop-path draws (and CrossMAE query subset) in every mode
        loss = model(imgs, mask)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    ref_loss, ref = run("none")
    loss, grads = run(mode)
    assert torch.equal(loss, ref_loss), (mode, loss.item(), ref_loss.item())
    worst = max((grads[n] - g).abs().max().item() for n, g in ref.items())
    assert worst <= 1e-6, f"{name} {mode}: largest gradient difference {worst:.3g}"

    from affmae.bench.memory import saved_activation_bytes

    def saved(m: str) -> int:  # checkpointed blocks keep nothing for the backward
        torch.manual_seed(0)
        model = create_model(name, drop_path=0.2, grad_checkpoint=m).train()
        return saved_activation_bytes(model, lambda: model(imgs, mask)["loss"]).total

    full, ckpt = saved("none"), saved(mode)
    assert ckpt < 0.9 * full, f"{name} {mode}: saved {ckpt} B vs {full} B without checkpointing"
    with pytest.raises(ValueError, match="grad_checkpoint must be one of"):
        create_model(name, grad_checkpoint="yes")
