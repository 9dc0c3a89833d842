import pytest
import torch
import torch.nn.functional as F

import setr
from reference import ref_json


def empty_model(head, **kw):
    """ViT-L SETR with uninitialized storage (fast to build; loaders overwrite it)."""
    model = setr.build_setr(head, device="meta", **kw)
    return model.to_empty(device="cpu")


def fabricate(shapes, seed=0):
    """Random tensors for {key: shape}; integer-valued for BN's num_batches_tracked."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        else:
            out[k] = torch.randn(shape, generator=g) if len(shape) <= 2 and sum(shape) < 5000 \
                else torch.zeros(()).expand(shape)  # big tensors: no memory
    return out


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_mmseg_keys_load_strictly_and_round_trip(head, tmp_path):
    shapes = ref_json(f"mmseg_setr_{head}_keys.json")
    ckpt = {"meta": {"mmseg_version": "0.15.0"}, "state_dict": fabricate(shapes)}
    path = tmp_path / "setr.pth"
    torch.save(ckpt, path)
    model = empty_model(head)
    report = setr.load_mmseg_checkpoint(model, path)
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    state = model.state_dict()
    assert list(state) == list(shapes)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(state[k], v.to(state[k].dtype)), k


def test_mmseg_checkpoint_without_wrapper_and_without_patch_bias():
    shapes = ref_json("mmseg_setr_pup_keys.json")
    sd = fabricate(shapes)
    del sd["backbone.patch_embed.projection.bias"]
    model = empty_model("pup")
    report = setr.load_mmseg_checkpoint(model, sd)
    assert any("set to zero" in n for n in report["notes"])
    assert model.backbone.patch_embed.projection.bias.abs().sum() == 0


def test_missing_key_is_named():
    sd = fabricate(ref_json("mmseg_setr_naive_keys.json"))
    del sd["decode_head.conv_seg.weight"]
    with pytest.raises(ValueError, match="missing key.*decode_head.conv_seg.weight"):
        setr.load_mmseg_checkpoint(empty_model("naive"), sd)
    report = setr.load_mmseg_checkpoint(empty_model("naive"), sd, strict=False)
    assert report["missing"] == ["decode_head.conv_seg.weight"]


def test_wrong_shape_is_named():
    sd = fabricate(ref_json("mmseg_setr_naive_keys.json"))
    sd["decode_head.conv_seg.weight"] = torch.zeros(19, 256, 1, 1)  # a Cityscapes head
    sd["decode_head.conv_seg.bias"] = torch.zeros(19)
    with pytest.raises(ValueError, match=r"mis-shaped.*decode_head.conv_seg.weight \(checkpoint \(19, 256, 1, 1\)"):
        setr.load_mmseg_checkpoint(empty_model("naive"), sd)


def test_checkpoint_of_another_head_is_rejected():
    sd = fabricate(ref_json("mmseg_setr_pup_keys.json"))
    with pytest.raises(ValueError, match="unexpected key"):
        setr.load_mmseg_checkpoint(empty_model("naive"), sd)


def test_non_checkpoint_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=32)
    with pytest.raises(ValueError, match="notes.txt: not a readable PyTorch checkpoint"):
        setr.load_mmseg_checkpoint(model, text)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        setr.load_mmseg_checkpoint(model, tmp_path / "nothere.pth")
    truncated = tmp_path / "truncated.pth"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.pth"):
        setr.load_mmseg_checkpoint(model, truncated)
    listfile = tmp_path / "list.pth"
    torch.save([1, 2, 3], listfile)
    with pytest.raises(ValueError, match="expected a dict"):
        setr.load_mmseg_checkpoint(model, listfile)


def test_timm_vit_large_loads_with_pos_embed_resized():
    shapes = ref_json("timm_vit_large_patch16_384_keys.json")
    sd = fabricate(shapes)
    sd["pos_embed"] = torch.randn(1, 577, 1024)
    model = empty_model("pup")
    report = setr.load_timm_vit(model, {"model": sd})
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    assert any("24, 24" in n and "32, 32" in n for n in report["notes"])
    pos = model.backbone.pos_embed.detach()
    grid = sd["pos_embed"][:, 1:].reshape(1, 24, 24, 1024).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(pos[:, :1], sd["pos_embed"][:, :1])
    keymap = ref_json("timm_to_mmseg_backbone_keymap.json")
    state = model.backbone.state_dict()
    for timm_key, mmseg_key in keymap.items():
        if timm_key.startswith("blocks.3.") or timm_key == "cls_token":
            assert torch.equal(state[mmseg_key], sd[timm_key]), timm_key


def test_timm_key_map_matches_reference():
    keymap = ref_json("timm_to_mmseg_backbone_keymap.json")
    for timm_key, mmseg_key in keymap.items():
        if timm_key.startswith("norm."):  # the final norm (mmseg ln1) that SETR does not build
            assert setr.weights.timm_to_mmseg_key(timm_key) is None
        else:
            assert setr.weights.timm_to_mmseg_key(timm_key) == mmseg_key


def test_timm_missing_block_is_an_error():
    sd = fabricate(ref_json("timm_vit_large_patch16_384_keys.json"))
    del sd["blocks.23.mlp.fc2.weight"]
    with pytest.raises(ValueError, match="layers.23.ffn.layers.1.weight"):
        setr.load_timm_vit(empty_model("mla"), sd)


def test_export_round_trip(tmp_path):
    model = setr.build_setr("mla", backbone="vit_tiny", num_classes=5, img_size=64).eval()
    path = setr.export_model(model, tmp_path / "out" / "model.pth", class_names=list("abcde"))
    meta = setr.read_checkpoint_meta(path)
    assert meta["head"] == "mla" and meta["backbone"] == "vit_tiny" and meta["class_names"] == list("abcde")
    other = setr.build_setr("mla", backbone="vit_tiny", num_classes=5, img_size=64).eval()
    setr.load_mmseg_checkpoint(other, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
    with pytest.raises(ValueError, match="head 'mla'"):
        setr.load_mmseg_checkpoint(setr.build_setr("pup", backbone="vit_tiny", num_classes=5, img_size=64), path)
    assert not any(p.name.startswith("model.pth.tmp") for p in (tmp_path / "out").iterdir())


def test_float64_checkpoint_pos_embed_is_resized_in_float64():
    """A float64 checkpoint trained at another grid loads with its pos-embed resized in float64."""
    src = setr.build_setr("pup", backbone="vit_tiny", num_classes=5, img_size=48, dtype=torch.float64)
    dst = setr.build_setr("pup", backbone="vit_tiny", num_classes=5, img_size=80, dtype=torch.float64)
    report = setr.load_mmseg_checkpoint(dst, src.state_dict())
    assert any("(3, 3) to (5, 5)" in n for n in report["notes"])
    pos = src.backbone.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(5, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    got = dst.backbone.pos_embed.detach()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.cat([pos[:, :1], expected], dim=1), rtol=0, atol=1e-15)
