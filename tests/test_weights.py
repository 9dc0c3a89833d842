import os
import shutil
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import setr
from reference import ref_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    for content in ("hello", "some\nlines of text\n"):  # torch.load: KeyError: 101, IndexError: pop from empty list
        text.write_text(content)
        with pytest.raises(ValueError, match="notes.txt: not a readable PyTorch checkpoint"):
            setr.load_timm_vit(model, text)  # --pretrained
    text.write_bytes(b"")
    with pytest.raises(ValueError, match="notes.txt: empty file"):
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


# ------------------------------------------------------------------ safetensors and the hub cache
MMSEG_TO_TIMM = {"ln1.": "norm1.", "ln2.": "norm2.", "attn.attn.in_proj_weight": "attn.qkv.weight",
                 "attn.attn.in_proj_bias": "attn.qkv.bias", "attn.attn.out_proj.": "attn.proj.",
                 "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2."}


def tiny_timm_state(seed=0):
    """A timm-format ViT state dict for the vit_tiny backbone at 48 px (3x3 grid), with timm's
    classifier and final norm, random values."""
    g = torch.Generator().manual_seed(seed)
    own = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48).backbone.state_dict()
    sd = {}
    for k, v in own.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            old = next(o for o in MMSEG_TO_TIMM if rest.startswith(o))
            k = f"blocks.{i}.{MMSEG_TO_TIMM[old]}{rest[len(old):]}"
        k = k.replace("patch_embed.projection.", "patch_embed.proj.")
        sd[k] = torch.randn(v.shape, generator=g)
    sd.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128),
               "head.weight": torch.randn(10, 128, generator=g), "head.bias": torch.zeros(10)})
    return sd


def test_safetensors_and_bin_files_load_without_torch_load(tmp_path, monkeypatch):
    sd = tiny_timm_state()
    st = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(sd, st)
    seg = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48).state_dict()
    seg_st = tmp_path / "setr_pup.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in seg.items()}, seg_st)
    torch.save({"model": sd}, tmp_path / "pytorch_model.bin")
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used on a safetensors file"))
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48)
    report = setr.load_timm_vit(model, st)
    assert not report["missing"] and not report["unexpected"] and report["source"] == str(st)
    assert torch.equal(model.backbone.layers[2].attn.attn.in_proj_weight, sd["blocks.2.attn.qkv.weight"])
    other = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48)
    setr.load_mmseg_checkpoint(other, seg_st)
    assert all(torch.equal(v, seg[k]) for k, v in other.state_dict().items())
    monkeypatch.setattr(torch, "load", real_load)
    again = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48)
    setr.load_timm_vit(again, tmp_path / "pytorch_model.bin")
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in again.backbone.state_dict().items())
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(st.read_bytes()[:300])
    with pytest.raises(ValueError, match="broken.safetensors: not a readable safetensors file"):
        setr.load_timm_vit(model, broken)


HUB_SCRIPT = """
import os, sys, torch, huggingface_hub, setr
sd_file, commit = sys.argv[1], sys.argv[2]
expected = setr.weights.hub_weights("timm/vit_tiny_fake")
assert expected.endswith(os.path.join("snapshots", commit, "model.safetensors")), expected
for name in ("timm/vit_tiny_fake", "hf-hub:timm/vit_tiny_fake"):
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48)
    report = setr.load_timm_vit(model, name)
    assert report["source"] == expected and not report["missing"], report
    ref = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=48)
    setr.load_timm_vit(ref, sd_file)
    assert all(torch.equal(v, ref.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())
for offline in (False, True):
    huggingface_hub.constants.HF_HUB_OFFLINE = offline  # what HF_HUB_OFFLINE=1 sets at import
    try:
        setr.load_timm_vit(model, "timm/vit_absent")
    except FileNotFoundError as e:
        print(e)
"""


def test_hub_names_resolve_through_the_local_cache_and_fail_fast_without_network(tmp_path):
    """timm/<model> and hf-hub:timm/<model> read a fabricated HF cache under HF_HOME, with the hub
    unreachable (HF_ENDPOINT: a closed local port); an uncached model fails at once, in one line
    naming the file to fetch and where it goes: no retries, no logging of them."""
    sd_file = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(tiny_timm_state(seed=1), sd_file)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_tiny_fake"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(sd_file, repo / "snapshots" / commit / "model.safetensors")
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}",
                   PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(sd_file), commit], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Retrying" not in out.stderr and "thrown while requesting" not in out.stderr, out.stderr
    unreachable, offline = out.stdout.splitlines()  # one line each
    for message in (unreachable, offline):
        assert "model.safetensors of timm/vit_absent is not in the Hugging Face cache" in message, message
        assert str(tmp_path / "hf" / "hub") in message
        assert "https://huggingface.co/timm/vit_absent/resolve/main/model.safetensors" in message
    assert "the hub cannot be reached (" in unreachable and "HF_HUB_OFFLINE is set" in offline


def test_pretrained_flag_accepts_hub_names_and_checks_files(tmp_path):
    assert setr.weights.is_hub_id("timm/vit_large_patch16_384.augreg_in21k_ft_in1k")
    assert setr.weights.is_hub_id("hf-hub:timm/vit_large_patch16_384")
    assert not setr.weights.is_hub_id(tmp_path / "vit.safetensors")
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "local.pth").write_bytes(b"")
    assert not setr.weights.is_hub_id(str(tmp_path / "timm" / "local.pth"))
    from train.config import ConfigError, parse_config

    cfg = parse_config(["--pretrained", "timm/vit_large_patch16_384.augreg_in21k_ft_in1k"], cuda_available=False)
    cfg.validate()
    with pytest.raises(ConfigError, match="missing.safetensors': no such file"):
        parse_config(["--pretrained", str(tmp_path / "missing.safetensors")], cuda_available=False).validate()
