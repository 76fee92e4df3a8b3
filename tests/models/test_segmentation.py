"""Segmentation model on an MAE backbone: shapes, gradients, LLRD ids, checkpoint round trips."""

import pytest
import torch

from affmae import create_model, load_model
from affmae.models.registry import config_dict, save_safetensors
from affmae.models.segmentation import Segmenter


def test_segmenter_logits_and_gradients():
    model = create_model("segmenter", backbone="aff_tiny", num_classes=3)
    x = torch.randn(2, 1, 64, 48)
    logits = model(x)
    assert logits.shape == (2, 3, 64, 48)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 64, 48))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (DDP would fail): {missing}"
    assert not hasattr(model.backbone, "head"), "pretraining pixel head was kept"


def test_layer_ids_follow_depth():
    model = create_model("segmenter", backbone="aff_tiny", num_classes=2)
    L = model.num_layers
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["backbone.encoder.patch_embed.weight"] == 0
    assert ids["head.1.weight"] == L + 1
    assert ids["backbone.decoder.query_token"] == L + 1
    stages = sorted({v for n, v in ids.items() if ".stages." in n})
    assert stages == list(range(1, L + 1)), f"stage ids {stages}"
    assert ids["backbone.encoder.merges.0.reduction.weight"] == 1


def test_from_pretrained_loads_backbone_weights(tmp_path):
    torch.manual_seed(0)
    mae = create_model("aff_tiny")
    save_safetensors(mae, tmp_path / "mae.safetensors", data_stats={"mean": 0.5, "std": 0.2})
    seg = Segmenter.from_pretrained(str(tmp_path / "mae.safetensors"), num_classes=2)
    for name, p in mae.encoder.state_dict().items():
        assert torch.equal(seg.backbone.encoder.state_dict()[name], p), f"{name} not loaded"
    assert seg.data_stats == {"mean": 0.5, "std": 0.2}
    # The segmenter itself round-trips through a checkpoint with its config.
    save_safetensors(seg, tmp_path / "seg.safetensors")
    again = load_model(tmp_path / "seg.safetensors")
    x = torch.randn(1, 1, 64, 64)
    seg.eval(), again.eval()
    assert torch.equal(seg(x), again(x)), "reloaded segmenter computes a different function"
    assert config_dict(again)["num_classes"] == 2


def test_dense_queries_start_from_their_own_token():
    """In dense prediction each query starts from its own patch's stage-1 token (raster order)."""
    torch.manual_seed(0)
    mae = create_model("aff_tiny").eval()
    x = torch.randn(1, 1, 64, 48)
    seen = {}
    forward = mae.decoder.forward

    def spy(stages, qpos, grid_hw, query_init=None, after="block"):
        seen["stages"], seen["qpos"], seen["init"] = stages, qpos, query_init
        return forward(stages, qpos, grid_hw, query_init, after)

    mae.decoder.forward = spy
    with torch.no_grad():
        mae.dense_features(x)
    first = seen["stages"][0]
    assert seen["init"] is not None, "dense queries start from the learned token only"
    # Query i sits at raster position i; its init must be the projection of the token there.
    at = {tuple(p): k for k, p in enumerate(first.pos[0].tolist())}
    proj = mae.decoder.blocks[-1][0].src_proj
    for i in (0, 13, 47):
        k = at[tuple(seen["qpos"][0, i].tolist())]
        torch.testing.assert_close(seen["init"][0, i], proj(first.x[0, k]))


def test_decoder_features_after_cross_attention_differ_from_block_outputs():
    torch.manual_seed(0)
    mae = create_model("aff_tiny").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        block = mae.dense_decoder_features(x)
        cross = mae.dense_decoder_features(x, after="cross")
    assert len(block) == len(cross) == 4 and block[-1].shape == cross[-1].shape == (1, 64, 64)
    assert not torch.allclose(block[-1], cross[-1]), "the FFN changed nothing: wrong capture"
    with pytest.raises(ValueError, match="after"):
        mae.dense_decoder_features(x, after="ffn")
