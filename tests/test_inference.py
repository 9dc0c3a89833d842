"""Slide / whole / multi-scale inference and evaluate (setr/inference.py)."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from setr.data import ADE20K, EvalSamples, PositionSampler, TrainSamples, build_dataset
from setr.data.transforms import eval_transform, rescale_size
from setr.inference import (aug_inference, encode_decode, evaluate, inference, slide_logits,
                            slide_windows)
from setr.metrics import SegMetric

C = 5


class PerPixel(nn.Module):
    """A per-pixel function (1x1 conv): output at each pixel depends on that pixel only."""

    def __init__(self, num_classes=C):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


class Contextual(nn.Module):
    """Depends on the window: 3x3 conv plus the window's mean (so window placement matters)."""

    def __init__(self, num_classes=C):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        self.proj = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x) + self.proj(x).mean(dim=(2, 3), keepdim=True)


def _mmseg_slide_reference(model, img, num_classes, crop, stride, ori_shape):
    """mmseg EncoderDecoder.slide_inference + inference(), transcribed loop for loop."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = encode_decode(model, crop_img, num_classes)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1),
                                            int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    preds = F.interpolate(preds, size=ori_shape, mode="bilinear", align_corners=False)
    return F.softmax(preds, dim=1)


# ------------------------------------------------------------------ window placement
def test_slide_windows_on_ade_sample_test_sizes(shared_dir):
    root = os.path.join(shared_dir, "data", "ade20k_sceneparsing_samples")
    ev = EvalSamples(ADE20K(root, "validation"))
    shapes = [tuple(ev[i][0].shape[1:]) for i in range(3)]
    assert shapes == [(512, 683), (512, 703), (512, 683)]
    # 683: w_grids = (683 - 512 + 340) // 341 + 1 = 2; second window x2 = 683, x1 = 171
    assert slide_windows(512, 683) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    # 703: second window starts at 341, ends at min(853, 703) = 703, moved to 191
    assert slide_windows(512, 703) == [(0, 512, 0, 512), (0, 512, 191, 703)]


def test_slide_windows_hand_cases():
    assert slide_windows(300, 200) == [(0, 300, 0, 200)]  # smaller than the crop: one window
    assert slide_windows(512, 512) == [(0, 512, 0, 512)]
    # 1100: grids = (1100 - 512 + 340) // 341 + 1 = 3 -> starts 0, 341, then 682 -> 588
    ys = sorted({(y1, y2) for y1, y2, _, _ in slide_windows(1100, 600)})
    assert ys == [(0, 512), (341, 853), (588, 1100)]
    xs = sorted({(x1, x2) for _, _, x1, x2 in slide_windows(1100, 600)})
    assert xs == [(0, 512), (88, 600)]
    for H, W in [(1100, 1500), (513, 2048), (97, 1001)]:
        count = np.zeros((H, W), dtype=int)
        for y1, y2, x1, x2 in slide_windows(H, W):
            assert 0 <= y1 < y2 <= H and 0 <= x1 < x2 <= W
            assert (y2 - y1, x2 - x1) == (min(512, H), min(512, W))
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1
    with pytest.raises(ValueError, match="leaves pixels"):
        slide_windows(600, 600, (64, 64), (80, 80))


# ------------------------------------------------------------------ slide vs whole
@torch.no_grad()
def test_slide_equals_whole_for_per_pixel_model():
    model = PerPixel().eval()
    for h, w in [(96, 160), (64, 64), (48, 208), (160, 96)]:  # divisible by 16
        x = torch.randn(1, 3, h, w)
        for out in [(h, w), (h + 7, w - 5)]:
            slide = inference(model, x, C, out, "slide", (64, 64), (43, 43))
            whole = inference(model, x, C, out, "whole")
            torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)
    # any size at least the crop: every window is a full crop, slide == the per-pixel map
    for h, w in [(100, 150), (77, 301), (64, 65)]:
        x = torch.randn(1, 3, h, w)
        torch.testing.assert_close(slide_logits(model, x, C, (64, 64), (43, 43)), model(x),
                                   rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_slide_matches_mmseg_reference_loop():
    torch.manual_seed(0)
    model = Contextual().eval()
    for (h, w), crop, stride in [((100, 150), (64, 64), (43, 43)), ((37, 150), (64, 64), (43, 43)),
                                 ((130, 70), (64, 32), (40, 20)), ((50, 40), (64, 64), (43, 43))]:
        x = torch.randn(1, 3, h, w)
        ori = (h * 2 - 3, w + 11)
        ours = inference(model, x, C, ori, "slide", crop, stride, window_batch=3)
        ref = _mmseg_slide_reference(model, x, C, crop, stride, ori)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert ours.shape == (1, C, *ori)
        torch.testing.assert_close(ours.sum(1), torch.ones(1, *ori))


@torch.no_grad()
def test_tiny_setr_on_ade_test_sizes(shared_dir):
    setr = pytest.importorskip("setr")
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=150, img_size=64).eval()
    root = os.path.join(shared_dir, "data", "ade20k_sceneparsing_samples")
    ev = EvalSamples(ADE20K(root, "validation"), scale=(256, 128))  # small test scale: fast
    for i in range(3):
        image, label, _ = ev[i]
        for mode in ("slide", "whole") if i == 1 else ("whole",):
            probs = inference(model, image, 150, label.shape, mode, (64, 64), (43, 43))
            assert probs.shape == (1, 150, *label.shape) and torch.isfinite(probs).all()
            torch.testing.assert_close(probs.sum(1), torch.ones(1, *label.shape))


def test_bad_inference_arguments():
    model = PerPixel().eval()
    x = torch.randn(1, 3, 40, 40)
    with pytest.raises(ValueError, match=r"multiples of the patch size 16.*\(500, 500\)"):
        inference(model, x, C, (40, 40), "slide", (500, 500), (341, 341))
    with pytest.raises(ValueError, match="mode must be"):
        inference(model, x, C, (40, 40), "tiles")
    with pytest.raises(ValueError, match="returned 5 channels, expected num_classes=7"):
        inference(model, x, 7, (40, 40), "slide", (32, 32), (16, 16))
    with pytest.raises(ValueError, match="expected one image"):
        inference(model, torch.randn(2, 3, 8, 8), C, (8, 8))


# ------------------------------------------------------------------ multi-scale + flip
@torch.no_grad()
def test_aug_inference():
    torch.manual_seed(0)
    # 48x80 at scale (160, 96) -> 96x160: divisible by 16, so whole-image inference pads
    # nothing and a per-pixel model is exactly flip-equivariant
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    model = PerPixel().eval()
    # one scale, no flip == plain inference at that scale
    single = aug_inference(model, image, C, scale=(160, 96), ratios=(1.0,), flip=False,
                           mode="whole")
    plain = inference(model, eval_transform(image, (160, 96)), C, (48, 80), "whole")
    torch.testing.assert_close(single, plain)
    # a per-pixel model commutes with flips: flip averaging changes nothing
    flipped = aug_inference(model, image, C, scale=(160, 96), ratios=(1.0,), mode="whole")
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-6)
    # 6 scales x 2 flips of a contextual model: the mean of the 12 passes
    ctx = Contextual().eval()
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    ms = aug_inference(ctx, image, C, scale=(160, 96), mode="slide", crop_size=(32, 32),
                       stride=(21, 21))
    ref = 0
    for r in ratios:
        x = eval_transform(image, (int(160 * r), int(96 * r)))
        assert x.shape[1:] == rescale_size(48, 80, (int(160 * r), int(96 * r)))
        ref = ref + inference(ctx, x, C, (48, 80), "slide", (32, 32), (21, 21))
        ref = ref + inference(ctx, x.flip(-1), C, (48, 80), "slide", (32, 32), (21, 21)).flip(-1)
    torch.testing.assert_close(ms, ref / 12, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ evaluate
def _synthetic_eval(n=6):
    ds = build_dataset("synthetic", split="validation", synthetic_size=(48, 64),
                       synthetic_samples=n, num_classes=C)
    return EvalSamples(ds, scale=(80, 60))


def test_evaluate_matches_manual_loop():
    torch.manual_seed(0)
    model = Contextual().train()
    ev = _synthetic_eval()
    r = evaluate(model, ev, C, 255, mode="slide", crop_size=(32, 32), stride=(21, 21))
    assert model.training  # mode restored
    m = SegMetric(C, 255)
    model.eval()
    for i in range(len(ev)):
        image, label, _ = ev[i]
        probs = inference(model, image, C, label.shape, "slide", (32, 32), (21, 21))
        m.update(probs.argmax(1)[0], label)
    ref = m.compute()
    assert r["mIoU"] == pytest.approx(ref["mIoU"]) and r["aAcc"] == pytest.approx(ref["aAcc"])
    assert r["num_images"] == 6 and "background" in r["table"]
    assert [p["name"] for p in r["per_class"]] == list(ev.class_names)
    # prefetching workers and max_samples
    r2 = evaluate(model, ev, C, 255, mode="slide", crop_size=(32, 32), stride=(21, 21),
                  num_workers=2)
    assert r2["IoU"] == pytest.approx(r["IoU"], nan_ok=True)
    assert evaluate(model, ev, C, 255, mode="whole", max_samples=2)["num_images"] == 2
    ra = evaluate(model, ev, C, 255, mode="whole", max_samples=1, aug=True)
    assert ra["num_images"] == 1 and 0 <= ra["mIoU"] <= 100


def _eval_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(0)
    model = Contextual()
    r = evaluate(model, _synthetic_eval(), C, 255, mode="slide", crop_size=(32, 32),
                 stride=(21, 21), rank=rank, world_size=world_size)
    torch.save({k: r[k] for k in ("IoU", "mIoU", "aAcc", "num_images")},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_evaluate_distributed_equals_single(tmp_path):
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    single = evaluate(Contextual(), _synthetic_eval(), C, 255, mode="slide",
                      crop_size=(32, 32), stride=(21, 21))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["num_images"] == 6
        assert got["IoU"] == pytest.approx(single["IoU"], nan_ok=True)
        assert got["aAcc"] == pytest.approx(single["aAcc"])


def test_synthetic_is_learnable():
    """A tiny conv net trained 80 steps on synthetic crops beats chance by far."""
    torch.manual_seed(0)
    K = 8
    train = build_dataset("synthetic", split="training", synthetic_size=(64, 80),
                          synthetic_samples=256)
    val = EvalSamples(build_dataset("synthetic", split="validation", synthetic_size=(64, 80),
                                    synthetic_samples=24), scale=(80, 64))
    samples = TrainSamples(train, 32, seed=0, scale=(80, 64), ratio_range=(0.75, 1.5))
    ch = 16
    net = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(ch, ch, 3, padding=2, dilation=2), nn.ReLU(),
                        nn.Conv2d(ch, ch, 3, padding=4, dilation=4), nn.ReLU(),
                        nn.Conv2d(ch, K, 1))

    class Background(nn.Module):  # chance-level baseline: everything is background
        def forward(self, x):
            out = torch.zeros(x.shape[0], K, *x.shape[2:])
            out[:, 0] = 1
            return out

    baseline = evaluate(Background(), val, K, 255, mode="whole")["mIoU"]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(samples, batch_size=8,
                                         sampler=PositionSampler(0, 0, 1, 8))
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(net(x), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 80:
            break
    trained = evaluate(net, val, K, 255, mode="whole")["mIoU"]
    assert baseline < 15 and trained > 30 and trained > 3 * baseline, (baseline, trained)


@pytest.mark.gpu
@torch.no_grad()
def test_inference_and_evaluate_on_cuda():
    setr = pytest.importorskip("setr")
    torch.manual_seed(0)
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=C, img_size=64).eval()
    x = torch.randn(3, 100, 150)
    cpu = inference(model, x, C, (90, 160), "slide", (64, 64), (43, 43))
    gpu = inference(model.cuda(), x, C, (90, 160), "slide", (64, 64), (43, 43))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
    r = evaluate(model, _synthetic_eval(), C, 255, mode="slide", crop_size=(32, 32),
                 stride=(21, 21), autocast_dtype=torch.bfloat16)
    assert r["num_images"] == 6 and 0 <= r["mIoU"] <= 100
