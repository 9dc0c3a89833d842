"""Datasets, transforms and samplers (setr/data): real ADE20K samples, bad input, determinism."""
import csv
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from setr.data import (ADE20K, ADE20K_CLASSES, ADE20K_PALETTE, MEAN, STD, DataError,
                       EvalSamples, FolderSegmentation, PositionSampler, SyntheticSegmentation,
                       TrainSamples, build_dataset, read_label)
from setr.data import transforms as T

ADE_SIZES = {"ADE_val_00000001": (512, 683), "ADE_val_00000002": (364, 500),
             "ADE_val_00000003": (300, 400)}  # (H, W), from the data README
ADE_RAW_VALUES = {"ADE_val_00000001": {0, 1, 2, 3, 5, 7, 10, 18},
                  "ADE_val_00000002": {0, 1, 2, 3, 5, 14, 18},
                  "ADE_val_00000003": {0, 1, 2, 3, 5, 7, 12, 21, 44, 81, 88, 97, 103}}


def shared_data(shared_dir, name):
    """The shared data folder `name`; skips the test where it is absent."""
    root = os.path.join(shared_dir, "data", name)
    if not os.path.isdir(root):
        pytest.skip(f"{root} not found")
    return root


@pytest.fixture
def ade_root(shared_dir):
    return shared_data(shared_dir, "ade20k_sceneparsing_samples")


@pytest.fixture
def ade(ade_root):
    return ADE20K(ade_root, "validation")


def _reduced(values):
    return {255 if v == 0 else v - 1 for v in values}


# ------------------------------------------------------------------ ADE20K metadata
def test_ade20k_class_names_match_official_csv(ade_root):
    with open(os.path.join(ade_root, "meta", "objectInfo150.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ADE20K_CLASSES) == 150
    for idx, (name, row) in enumerate(zip(ADE20K_CLASSES, rows), start=1):
        assert int(row["Idx"]) == idx
        # the csv joins words and synonyms with ';'; each name is one synonym, words joined by ' '
        assert f";{name.replace(' ', ';')};" in f";{row['Name']};", (name, row["Name"])
        assert row["Name"].startswith(name.split(" ")[0])


def test_ade20k_palette_matches_color150(ade_root):
    import scipy.io  # pinned in requirements.txt; imported here, where a .mat file is read

    colors = scipy.io.loadmat(os.path.join(ade_root, "meta", "color150.mat"))["colors"]
    assert np.array_equal(np.asarray(ADE20K_PALETTE), colors)


# ------------------------------------------------------------------ loading
def test_ade20k_loader_reduce_zero_label(ade, ade_root):
    assert len(ade) == 3 and ade.num_classes == 150 and ade.ignore_index == 255
    assert ade.class_names == ADE20K_CLASSES and ade.palette == ADE20K_PALETTE
    for i in range(3):
        image, label, name = ade[i]
        assert image.dtype == np.uint8 and image.shape == ADE_SIZES[name] + (3,)
        assert label.dtype == np.int64 and label.shape == ADE_SIZES[name]
        raw = np.array(Image.open(os.path.join(ade_root, "annotations", "validation",
                                               name + ".png")))
        assert set(np.unique(raw).tolist()) == ADE_RAW_VALUES[name]
        assert set(np.unique(label).tolist()) == _reduced(ADE_RAW_VALUES[name])
        # pixel by pixel: 0 -> 255, k -> k - 1
        assert np.array_equal(label == 255, raw == 0)
        assert np.array_equal(label[raw > 0], raw[raw > 0].astype(np.int64) - 1)
        # image decoded as RGB
        ref = np.array(Image.open(os.path.join(ade_root, "images", "validation",
                                               name + ".jpg")).convert("RGB"))
        assert np.array_equal(image, ref)


def test_split_aliases_and_missing_split(ade_root):
    assert len(ADE20K(ade_root, "val")) == 3
    with pytest.raises(DataError, match=r"'training' does not exist.*splits found: validation"):
        ADE20K(ade_root, "training")


def test_camvid_folder_dataset(shared_dir):
    root = shared_data(shared_dir, "camvid_segnet_subset")
    ds = build_dataset("folder", root, "val", num_classes=11, ignore_index=11)
    assert len(ds) == 13 and ds.class_names[0] == "Sky" and ds.class_names[-1] == "Bicyclist"
    image, label, _ = ds[0]
    assert image.shape == (360, 480, 3) and label.shape == (360, 480)
    assert label.min() >= 0 and label.max() <= 11
    sample = TrainSamples(ds, 64, seed=0, scale=(480, 360))[0]
    assert set(sample[1].unique().tolist()) <= set(range(12))  # padded with ignore 11, not 255


# ------------------------------------------------------------------ bad input
def _make_folder(tmp_path, ade_root, n=2, split="training"):
    """A folder dataset holding copies of real ADE20K samples."""
    root = tmp_path / "ds"
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for name in sorted(ADE_SIZES)[:n]:
        shutil.copy(os.path.join(ade_root, "images", "validation", name + ".jpg"),
                    root / "images" / split / (name + ".jpg"))
        shutil.copy(os.path.join(ade_root, "annotations", "validation", name + ".png"),
                    root / "annotations" / split / (name + ".png"))
    return root


def _folder(root, split="training"):
    return FolderSegmentation(root, split, num_classes=150, reduce_zero_label=True)


def test_corrupt_and_truncated_files(tmp_path, ade_root):
    root = _make_folder(tmp_path, ade_root)
    img = root / "images" / "training" / "ADE_val_00000001.jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])  # truncated jpeg
    with pytest.raises(DataError, match=r"ADE_val_00000001\.jpg.*cannot decode image"):
        _folder(root)[0]
    img.write_bytes(b"not an image at all" * 10)  # garbage
    with pytest.raises(DataError, match=r"ADE_val_00000001\.jpg.*cannot decode image"):
        _folder(root)[0]
    lab = root / "annotations" / "training" / "ADE_val_00000002.png"
    data = lab.read_bytes()
    lab.write_bytes(data[: len(data) // 2])  # truncated png
    with pytest.raises(DataError, match=r"ADE_val_00000002\.png.*cannot decode label"):
        _folder(root)[1]


def test_size_mismatch_and_bad_label_values(tmp_path, ade_root):
    root = _make_folder(tmp_path, ade_root)
    lab = root / "annotations" / "training" / "ADE_val_00000001.png"
    raw = np.array(Image.open(lab))
    Image.fromarray(raw[:-1]).save(lab)
    with pytest.raises(DataError, match=r"ADE_val_00000001\.png.*size 683x511.*does not match "
                                        r"image .*ADE_val_00000001\.jpg size 683x512"):
        _folder(root)[0]
    bad = raw.copy()
    bad[0, :5] = 151  # raw 151 -> class 150, outside [0, 150)
    bad[1, :2] = 200
    Image.fromarray(bad).save(lab)
    with pytest.raises(DataError, match=r"ADE_val_00000001\.png.*values \[151, 200\] \(7 "
                                        r"pixels\).*outside \[0, 150\)"):
        _folder(root)[0]
    Image.fromarray(np.stack([raw] * 3, -1)).save(lab)  # a colour label
    with pytest.raises(DataError, match=r"ADE_val_00000001\.png.*single-channel.*RGB"):
        _folder(root)[0]
    assert _folder(root)[1][1].shape == (364, 500)  # the other sample is fine


def test_missing_and_empty_folders_and_unpaired_files(tmp_path, ade_root):
    root = _make_folder(tmp_path, ade_root)
    with pytest.raises(DataError, match=r"'validation' does not exist.*splits found: training"):
        _folder(root, "validation")
    (root / "images" / "validation").mkdir()
    with pytest.raises(DataError, match=r"images.validation.*no images"):
        _folder(root, "validation")
    os.remove(root / "annotations" / "training" / "ADE_val_00000002.png")
    with pytest.raises(DataError, match=r"ADE_val_00000002\.jpg: image has no label .*"
                                        r"ADE_val_00000002\.png"):
        _folder(root)
    shutil.copy(os.path.join(ade_root, "annotations", "validation", "ADE_val_00000002.png"),
                root / "annotations" / "training" / "ADE_val_00000002.png")
    os.remove(root / "images" / "training" / "ADE_val_00000002.jpg")
    with pytest.raises(DataError, match=r"ADE_val_00000002\.png: label has no image"):
        _folder(root)


def test_bad_dataset_arguments(tmp_path, ade_root):
    root = _make_folder(tmp_path, ade_root)
    with pytest.raises(ValueError, match="ignore_index 5 is a valid class id"):
        FolderSegmentation(root, "training", num_classes=150, ignore_index=5)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"names\.txt: 2 class names, expected num_classes=150"):
        FolderSegmentation(root, "training", num_classes=150, class_names=str(names))
    with pytest.raises(ValueError, match="ADE20K has 150 classes"):
        build_dataset("ade20k", root, "training", num_classes=19)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kitti", root, "training")


def test_crop_size_must_be_multiple_of_patch(ade):
    with pytest.raises(ValueError, match=r"multiples of the patch size 16.*\(500, 500\)"):
        TrainSamples(ade, 500, seed=0)
    with pytest.raises(ValueError, match=r"\(512, 100\)"):
        TrainSamples(ade, (512, 100), seed=0)


def test_skip_corrupt_reports_file_and_substitutes(tmp_path, ade_root):
    root = _make_folder(tmp_path, ade_root, n=3)
    (root / "images" / "training" / "ADE_val_00000002.jpg").write_bytes(b"garbage")
    ds = _folder(root)
    strict = TrainSamples(ds, 64, seed=0, scale=(128, 64))
    lenient = TrainSamples(ds, 64, seed=0, scale=(128, 64), skip_corrupt=True)
    pos = next(p for p in range(3) if strict.dataset_index(p) == 1)
    with pytest.raises(DataError, match="ADE_val_00000002.jpg"):
        strict[pos]
    # raised in a DataLoader worker: still a DataError naming the file
    loader = torch.utils.data.DataLoader(strict, batch_size=1, sampler=[pos], num_workers=1)
    with pytest.raises(DataError, match="ADE_val_00000002.jpg"):
        next(iter(loader))
    image, label = lenient[pos]
    _, _, bad = lenient.collate([(image, label)])
    assert image.shape == (3, 64, 64) and len(bad) == 1 and bad[0][0].endswith("ADE_val_00000002.jpg")


# ------------------------------------------------------------------ transforms
def test_rescale_size_test_scale_of_ade_samples():
    assert T.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert T.rescale_size(364, 500, (2048, 512)) == (512, 703)  # 500 * 512 / 364 = 703.3
    assert T.rescale_size(300, 400, (2048, 512)) == (512, 683)  # 400 * 512 / 300 = 682.7
    assert T.rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound
    # train: ratio 0.5 of (2048, 512) -> (1024, 256)
    assert T.rescale_size(512, 683, (1024, 256)) == (256, 342)


def test_train_samples_on_ade_shapes_and_labels(ade):
    samples = TrainSamples(ade, 512, seed=3)
    for pos in range(4):
        image, label = samples[pos]
        name = ade.names[samples.dataset_index(pos)]
        assert image.shape == (3, 512, 512) and image.dtype == torch.float32
        assert label.shape == (512, 512) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= _reduced(ADE_RAW_VALUES[name])
        assert image.abs().max() < 3.0  # normalized
    # ratio 0.5: 512x683 -> 256x342, padded to 512 with 0 / 255
    small = TrainSamples(ade, 512, seed=0, ratio_range=(0.5, 0.5))
    pos = next(p for p in range(3) if small.dataset_index(p) == 0)
    image, label = small[pos]
    assert (image[:, 256:] == 0).all() and (image[:, :, 342:] == 0).all()
    assert (label[256:] == 255).all() and (label[:, 342:] == 255).all()
    assert (label[:256, :342] != 255).float().mean() > 0.5
    assert image[:, :256, :342].std() > 0.3


def test_train_samples_deterministic(ade):
    a = TrainSamples(ade, 256, seed=1)
    b = TrainSamples(ade, 256, seed=1)
    c = TrainSamples(ade, 256, seed=2)
    for pos in (0, 5, 1 << 40):
        xa, ya = a[pos]
        xb, yb = b[pos]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[7][0], c[7][0])


def test_epoch_permutations_cover_dataset():
    ds = SyntheticSegmentation(10, size=(32, 32))
    samples = TrainSamples(ds, 32, seed=4)
    for epoch in range(3):
        idx = [samples.dataset_index(p) for p in range(epoch * 10, epoch * 10 + 10)]
        assert sorted(idx) == list(range(10))
    assert [samples.dataset_index(p) for p in range(10)] != [samples.dataset_index(p)
                                                             for p in range(10, 20)]


def test_position_sampler_partitions_global_batches():
    B, W, A = 3, 2, 2
    G = B * W * A

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    per_rank = [take(PositionSampler(0, r, W, B, A), 3 * B * A) for r in range(W)]
    for it in range(3):
        got = sorted(p for r in range(W) for p in per_rank[r][it * B * A:(it + 1) * B * A])
        assert got == list(range(it * G, (it + 1) * G))
    # micro-step m of rank r: positions it*G + (m*W + r)*B + [0, B)
    assert per_rank[1][:B] == [3, 4, 5] and per_rank[0][B:2 * B] == [6, 7, 8]
    # resuming at iteration 2 continues where a fresh run is at iteration 2
    for r in range(W):
        assert take(PositionSampler(2 * G, r, W, B, A), B * A) == per_rank[r][2 * B * A:]
    with pytest.raises(ValueError):
        PositionSampler(0, 2, 2, 1)


def test_random_crop_uses_eleventh_box_when_no_crop_passes():
    label = np.zeros((100, 100), dtype=np.uint8)  # one class: no crop can pass
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    T.random_crop(image, label, (32, 32), rng, cat_max_ratio=0.75)
    ref = np.random.default_rng(0)
    for _ in range(11):
        ref.integers(0, 69), ref.integers(0, 69)
    assert rng.integers(1 << 30) == ref.integers(1 << 30)  # exactly 11 boxes drawn
    # two balanced classes: the first box that sees both is accepted
    label[:, 50:] = 1
    img2, lab2 = T.random_crop(image, label, (32, 32), np.random.default_rng(1), 0.75)
    counts = np.bincount(lab2.ravel(), minlength=2)
    assert lab2.shape == (32, 32) and min(counts) > 0 and max(counts) / counts.sum() < 0.75
    # crop larger than the image: the whole image
    img3, lab3 = T.random_crop(image, label, (128, 64), np.random.default_rng(2), 0.75)
    assert lab3.shape == (100, 64)


def test_normalize_and_pad():
    image = np.empty((5, 7, 3), dtype=np.uint8)
    image[:] = np.round(MEAN).astype(np.uint8)
    label = np.full((5, 7), 3, dtype=np.uint8)
    x, y = T.normalize_pad(image, label, (16, 16), ignore_index=255)
    expected = (np.round(MEAN) - np.array(MEAN)) / np.array(STD)
    assert torch.allclose(x[:, :5, :7], torch.tensor(expected, dtype=torch.float32)
                          .view(3, 1, 1).expand(3, 5, 7), atol=1e-6)
    assert (x[:, 5:] == 0).all() and (x[:, :, 7:] == 0).all()
    assert (y[:5, :7] == 3).all() and (y[5:] == 255).all() and (y[:, 7:] == 255).all()


def _bilinear_half_pixel(image, h, w):
    """Exact float64 bilinear resize, half-pixel centres, borders clamped (cv2's INTER_LINEAR rule)."""
    H, W = image.shape[:2]

    def taps(out, n):
        src = np.clip((np.arange(out) + 0.5) * (n / out) - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo

    y0, y1, fy = taps(h, H)
    x0, x1, fx = taps(w, W)
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_resize_is_opencv_as_mmcv_calls_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 150, (37, 53))
    label[0, 0] = 300  # wider than 8 bits: still exact
    for h, w in [(74, 106), (20, 31), (101, 29), (512, 733)]:
        ref = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        got = T.resize_image(image, (h, w))
        assert got.shape == (h, w, 3) and np.array_equal(got, ref)
        if h > 37 and w > 53:  # enlarging: no antialiasing question, within cv2's fixed point
            assert np.abs(got - _bilinear_half_pixel(image, h, w)).max() <= 1
        # nearest: source index floor(dst * in / out), dtype kept
        ys = np.floor(np.arange(h) * (37 / h)).astype(int)
        xs = np.floor(np.arange(w) * (53 / w)).astype(int)
        for lab in (label, (label % 150).astype(np.uint8)):
            out = T.resize_label(lab, (h, w))
            assert out.dtype == lab.dtype and np.array_equal(out, lab[ys][:, xs])
    assert T.resize_image(image, (37, 53)) is image


def _mmseg_photometric_cv2(img, rng):
    """mmseg PhotoMetricDistortion written as mmseg writes it (cv2 on BGR), same RNG order."""
    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    bgr = img[..., ::-1].copy()
    if rng.integers(2):
        bgr = convert(bgr, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        bgr = convert(bgr, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0 and rng.integers(2):
        bgr = convert(bgr, alpha=rng.uniform(0.5, 1.5))
    return bgr[..., ::-1]


def test_photometric_distortion_matches_mmseg(ade):
    image = ade[2][0]
    for seed in range(12):
        view = image[:, ::-1] if seed % 2 else image  # flipped crops arrive as strided views
        ours = T.photometric_distortion(view, np.random.default_rng(seed))
        ref = _mmseg_photometric_cv2(view, np.random.default_rng(seed))
        assert np.array_equal(ours, ref), seed


# ------------------------------------------------------------------ synthetic + loader
def test_synthetic_deterministic_and_valid():
    a = SyntheticSegmentation(20, size=(48, 64), seed=3)
    b = SyntheticSegmentation(20, size=(48, 64), seed=3)
    v = SyntheticSegmentation(20, size=(48, 64), seed=3, split="validation")
    for i in (0, 7, 19):
        ia, la, na = a[i]
        ib, lb, _ = b[i]
        assert np.array_equal(ia, ib) and np.array_equal(la, lb) and na.endswith(f"{i:06d}")
        assert ia.shape == (48, 64, 3) and ia.dtype == np.uint8 and la.dtype == np.int64
        assert not np.array_equal(ia, v[i][0])
    seen = np.unique(np.concatenate([a[i][1].ravel() for i in range(20)]))
    assert seen.tolist() == list(range(8))  # every class shows up
    assert a.class_names[:4] == ("background", "disk", "square", "triangle")
    assert len(a.palette) == 8


def test_dataloader_two_workers_deterministic():
    ds = build_dataset("synthetic", split="training", synthetic_size=(64, 80),
                       synthetic_samples=16)
    samples = TrainSamples(ds, 32, seed=0, scale=(160, 64))
    sampler = PositionSampler(0, rank=0, world_size=1, batch_per_rank=4)
    loader = torch.utils.data.DataLoader(samples, batch_size=4, sampler=sampler, num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    del it
    for k, (x, y) in enumerate(batches):
        assert x.shape == (4, 3, 32, 32) and y.shape == (4, 32, 32)
        for j in range(4):
            xr, yr = samples[k * 4 + j]
            assert torch.equal(x[j], xr) and torch.equal(y[j], yr)


def test_eval_samples_test_scale(ade):
    ev = EvalSamples(ade)
    for i in range(3):
        image, label, name = ev[i]
        H, W = ADE_SIZES[name]
        assert label.shape == (H, W) and label.dtype == torch.int64
        assert image.shape == (3,) + T.rescale_size(H, W, (2048, 512))
    assert ev[1][0].shape == (3, 512, 703)


def test_read_label_palette_mode(tmp_path):
    ids = np.arange(12, dtype=np.uint8).reshape(3, 4)
    im = Image.fromarray(ids)
    im.putpalette([0, 0, 0] * 256)
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_label(tmp_path / "p.png"), ids)
