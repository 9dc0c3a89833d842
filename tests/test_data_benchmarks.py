"""Cityscapes and Pascal Context (setr.data.catalog) on small fabricated datasets in their real layouts:
reading, the preset's training pipeline against a from-the-description mmseg pipeline (pixel-exact),
evaluation and prediction at each dataset's test settings, bad input, the position-embedding resize
768 / 480 crops need, and a short training run of every preset."""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import setr
from setr.data import (NAMED_DATASETS, Cityscapes, DataError, PascalContext, PascalContext59, build_dataset)
from setr.data.catalog import dataset_with_classes, short_min_of
from setr.data.samples import _AUG_TAG
from setr.inference import MS_RATIOS, aug_size
from test_data import _mmseg_photometric_cv2
from test_evaluate import label_ties, mmseg_format_checkpoint, mmseg_test_pipeline
from test_weights import tiny_timm_state
from train.build import build_data
from train.config import ConfigError, get_preset, parse_config

MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])

# cityscapesscripts helpers/labels.py: (name, id, trainId, color) of every label drawn into the images
CS_LABELS = [
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)), ("out of roi", 3, 255, (0, 0, 0)), ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)), ("ground", 6, 255, (81, 0, 81)), ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)), ("parking", 9, 255, (250, 170, 160)), ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)), ("wall", 12, 3, (102, 102, 156)), ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)), ("bridge", 15, 255, (150, 100, 100)), ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)), ("polegroup", 18, 255, (153, 153, 153)), ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)), ("vegetation", 21, 8, (107, 142, 35)), ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)), ("person", 24, 11, (220, 20, 60)), ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)), ("truck", 27, 14, (0, 0, 70)), ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)), ("trailer", 30, 255, (0, 0, 110)), ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)), ("bicycle", 33, 18, (119, 11, 32)),
]
CS_TRAIN_ID = np.array([train_id for _, _, train_id, _ in CS_LABELS], dtype=np.uint8)  # index: labelId


def _scene(rng, h, w, values, block=16, dominant=()):
    """A blocky (h, w) label map of random `values` and an RGB image whose colours follow it.
    dominant: values drawn for 95% of the blocks together (the others share 5%)."""
    p = None
    if dominant:
        p = np.where(np.isin(values, dominant), 0.95 / len(dominant), 0.05 / (len(values) - len(dominant)))
    grid = rng.choice(values, size=(-(-h // block), -(-w // block)), p=p)
    label = np.kron(grid, np.ones((block, block), dtype=np.int64))[:h, :w]
    image = (label[..., None] * np.array([37, 91, 53]) + rng.integers(0, 40, (h, w, 3))) % 256
    return image.astype(np.uint8), label.astype(np.uint8)


def make_cityscapes(root, splits=None, sizes=None, seed=0):
    """root/leftImg8bit/<split>/<city>/*_leftImg8bit.png with both *_gtFine_labelIds.png and
    *_gtFine_labelTrainIds.png (the trainIds made from the labelIds by labels.py's table).
    sizes: {split: (H, W)}, default 96x192. The second image of each training city is mostly
    unlabeled (ignored) and road: most crops of it are one class for > 75% of their counted pixels
    (RandomCrop's retry), but not if the ignored pixels were counted."""
    rng = np.random.default_rng(seed)
    splits = splits or {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 1}}
    for split, cities in splits.items():
        for city, n in cities.items():
            os.makedirs(root / "leftImg8bit" / split / city)
            os.makedirs(root / "gtFine" / split / city)
            for i in range(n):
                stem = f"{city}_{i:06d}_000019"
                image, label_ids = _scene(rng, *(sizes or {}).get(split, (96, 192)), values=np.arange(34),
                                          dominant=(0, 7) if split == "train" and i == 1 else ())
                Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(CS_TRAIN_ID[label_ids]).save(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
    return root


def make_pascal_context(parent, splits=None, size=(75, 100), seed=0):
    """parent/VOCdevkit/VOC2010 in mmseg's converted layout (labels 0 = background .. 59). The second
    training image is mostly background (ignored by pascal_context59) and label 5, the third mostly
    label 7: RandomCrop re-draws most of their crops, and for pascal_context59 some only because
    255 is not counted."""
    rng = np.random.default_rng(seed)
    root = parent / "VOCdevkit" / "VOC2010"
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        os.makedirs(root / folder)
    splits = splits or {"train": ["2008_000008", "2008_000002", "2009_000012"], "val": ["2008_000080"]}
    for split, names in splits.items():
        (root / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        for i, name in enumerate(names):
            image, label = _scene(rng, *size, values=np.arange(60), block=8,
                                  dominant={1: (0, 5), 2: (7,)}.get(i, ()) if split == "train" else ())
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(root / "SegmentationClassContext" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    # a wide validation image: rescaled into (2049, 1025) it is 768x2049, one row of four full 768x768
    # windows (the 48x48 grid the model is built for; half the model work of a 1025x2049 image)
    return make_cityscapes(tmp_path_factory.mktemp("cityscapes"), sizes={"val": (96, 256)})


@pytest.fixture(scope="module")
def pascal_parent(tmp_path_factory):
    parent = tmp_path_factory.mktemp("pascal")
    make_pascal_context(parent)
    return parent


# ------------------------------------------------------------------ metadata and reading
def test_cityscapes_classes_and_palette_are_the_train_ids_of_labels_py():
    named = NAMED_DATASETS["cityscapes"]
    by_train_id = {train_id: (name, color) for name, _, train_id, color in CS_LABELS if train_id != 255}
    assert named.classes == tuple(by_train_id[k][0] for k in range(19))
    assert named.palette == tuple(by_train_id[k][1] for k in range(19))
    assert dataset_with_classes(19) == "cityscapes" and dataset_with_classes(150) == "ade20k"
    assert dataset_with_classes(60) == "pascal_context" and dataset_with_classes(11) is None
    pc, pc59 = NAMED_DATASETS["pascal_context"], NAMED_DATASETS["pascal_context59"]
    assert pc.classes[0] == "background" and pc59.classes == pc.classes[1:] and pc59.palette == pc.palette[1:]
    assert len(set(pc.classes)) == 60 and list(pc.classes[1:]) == sorted(pc.classes[1:])  # mmseg 1.x: alphabetical
    assert (pc.palette[0], pc.palette[30], pc.palette[59]) == ((120, 120, 120), (8, 255, 214), (31, 0, 255))  # mmseg's


def test_cityscapes_reads_train_ids_else_converts_label_ids(cityscapes_root, tmp_path):
    ds = build_dataset("cityscapes", cityscapes_root, "training")
    assert isinstance(ds, Cityscapes) and not ds.from_label_ids and len(ds) == 3
    assert ds.names == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    assert (ds.num_classes, ds.ignore_index) == (19, 255)
    expected = []
    for i, name in enumerate(ds.names):
        image, label, got_name = ds[i]
        city = name.split("_")[0]
        bgr = cv2.imread(str(cityscapes_root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png"))
        train_ids = cv2.imread(str(cityscapes_root / "gtFine" / "train" / city / f"{name}_gtFine_labelTrainIds.png"),
                               cv2.IMREAD_UNCHANGED)
        assert got_name == name and np.array_equal(image, bgr[..., ::-1]) and np.array_equal(label, train_ids)
        assert set(np.unique(label)) <= set(range(19)) | {255} and len(np.unique(label)) > 2
        expected.append(label)
    assert len(np.unique(np.concatenate(expected))) == 20  # every class and 255
    # only labelIds: the same labels, mapped by labels.py's table when read
    for path in cityscapes_root.glob("gtFine/*/*/*_labelTrainIds.png"):
        os.rename(path, tmp_path / path.name)
    try:
        converted = Cityscapes(cityscapes_root, "train")
        assert converted.from_label_ids and converted.label_paths[0].endswith("_gtFine_labelIds.png")
        for i in range(3):
            assert np.array_equal(converted[i][1], expected[i])
    finally:
        for path in tmp_path.glob("*_labelTrainIds.png"):
            city = path.name.split("_")[0]
            split = "val" if city == "frankfurt" else "train"
            os.rename(path, cityscapes_root / "gtFine" / split / city / path.name)


def test_pascal_context_60_and_59_classes(pascal_parent):
    root = pascal_parent / "VOCdevkit" / "VOC2010"
    pc = build_dataset("pascal_context", pascal_parent, "training")  # a parent of VOCdevkit/VOC2010 works too
    pc59 = build_dataset("pascal_context59", root, "train")
    assert isinstance(pc, PascalContext) and isinstance(pc59, PascalContext59)
    assert pc.names == pc59.names == ["2008_000008", "2008_000002", "2009_000012"]  # the split file's order
    assert (pc.num_classes, pc59.num_classes, pc.reduce_zero_label, pc59.reduce_zero_label) == (60, 59, False, True)
    background = 0
    for i, name in enumerate(pc.names):
        raw = np.array(Image.open(root / "SegmentationClassContext" / f"{name}.png")).astype(np.int64)
        image, label, _ = pc[i]
        assert np.array_equal(image, cv2.imread(str(root / "JPEGImages" / f"{name}.jpg"))[..., ::-1])
        assert np.array_equal(label, raw) and len(np.unique(raw)) > 2
        assert np.array_equal(pc59[i][1], np.where(raw == 0, 255, raw - 1))
        background += (raw == 0).sum()
    assert background  # what pascal_context59 ignores
    assert len(build_dataset("pascal_context", root, "validation")) == 1


# ------------------------------------------------------------------ bad input
def test_cityscapes_bad_input(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": {"aachen": 2}, "val": {"lindau": 1}})
    gt = root / "gtFine" / "train" / "aachen"
    with pytest.raises(DataError, match=r"split folder 'test' does not exist \(splits found: train, val\)"):
        Cityscapes(root, "test")
    os.remove(gt / "aachen_000001_000019_gtFine_labelTrainIds.png")  # one image without its trainIds
    with pytest.raises(DataError, match=r"aachen_000001_000019_gtFine_labelTrainIds.png: trainIds label not found, "
                                        r"while 1 of the 2 .*csCreateTrainIdLabelImgs.*dataset_converters/cityscapes"):
        Cityscapes(root, "train")
    os.remove(gt / "aachen_000000_000019_gtFine_labelTrainIds.png")
    os.remove(gt / "aachen_000000_000019_gtFine_labelIds.png")  # and one without any label
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelTrainIds.png: label not found \(nor "
                                        r"aachen_000000_000019_gtFine_labelIds.png\)"):
        Cityscapes(root, "train")
    label_ids = gt / "aachen_000001_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((96, 192), 40, dtype=np.uint8)).save(gt / "aachen_000000_000019_gtFine_labelIds.png")
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelIds.png: label values \[40\] are not "
                                        r"Cityscapes labelIds \(0..33\)"):
        Cityscapes(root, "train")[0]
    Image.fromarray(np.zeros((95, 192), dtype=np.uint8)).save(label_ids)
    with pytest.raises(DataError, match=r"labelIds.png: label size 192x95 \(WxH\) does not match image .*"
                                        r"aachen_000001_000019_leftImg8bit.png size 192x96"):
        Cityscapes(root, "train")[1]
    train_ids = root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((96, 192), 19, dtype=np.uint8)).save(train_ids)
    with pytest.raises(DataError, match=r"values \[19\] .*outside \[0, 19\)"):
        Cityscapes(root, "val")[0]
    os.remove(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")  # an empty split
    with pytest.raises(DataError, match=r"leftImg8bit.val: no \*_leftImg8bit.png images in the split folder"):
        Cityscapes(root, "val")
    with pytest.raises(ValueError, match="Cityscapes has 19 classes, got num_classes=150"):
        build_dataset("cityscapes", root, "val", num_classes=150)
    with pytest.raises(ValueError, match="Cityscapes labels never use reduce_zero_label"):
        build_dataset("cityscapes", root, "val", reduce_zero_label=True)


def test_pascal_context_bad_input(tmp_path):
    root = make_pascal_context(tmp_path, {"train": ["a", "b"], "val": []})
    with pytest.raises(DataError, match=r"val.txt: the split lists no images"):
        PascalContext(root, "val")
    with pytest.raises(DataError, match=r"test.txt: split file for 'test' does not exist \(splits found: train, val\)"):
        PascalContext(root, "test")
    Image.fromarray(np.zeros((74, 100), dtype=np.uint8)).save(root / "SegmentationClassContext" / "b.png")
    with pytest.raises(DataError, match=r"b.png: label size 100x74 \(WxH\) does not match image .*b.jpg size 100x75"):
        PascalContext(root, "train")[1]
    Image.fromarray(np.full((75, 100), 60, dtype=np.uint8)).save(root / "SegmentationClassContext" / "b.png")
    with pytest.raises(DataError, match=r"b.png: label values \[60\] .*outside \[0, 60\)"):
        PascalContext(root, "train")[1]
    with pytest.raises(DataError, match=r"values \[60\] .*outside \[0, 59\) after reduce_zero_label"):
        PascalContext59(root, "train")[1]
    os.remove(root / "SegmentationClassContext" / "b.png")
    with pytest.raises(DataError, match=r"b.png: label not found .*dataset_converters/pascal_context.py"):
        PascalContext(root, "train")
    os.remove(root / "JPEGImages" / "a.jpg")
    with pytest.raises(DataError, match=r"a.jpg: image listed in .*train.txt not found"):
        PascalContext(root, "train")


# ------------------------------------------------------------------ training pipeline
def mmseg_train_pipeline(image_path, label_path, rng, scale, crop, reduce_zero_label):
    """mmseg 1.x's training pipeline of a SETR config, from its description, independently of
    setr.data: LoadImageFromFile (cv2, BGR) + LoadAnnotations (pillow; reduce_zero_label: 0 -> 255,
    k -> k - 1) -> RandomResize(scale, ratio_range=(0.5, 2.0), keep_ratio=True) -> RandomCrop(crop,
    cat_max_ratio=0.75) -> RandomFlip(prob=0.5) -> PhotoMetricDistortion -> bgr_to_rgb. The random
    draws are rng's, in the transforms' order. Returns (RGB uint8 image, label) before the padding,
    and for each crop RandomCrop rejected whether it would have passed with 255 counted as a class."""
    bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    seg = np.array(Image.open(label_path))
    if reduce_zero_label:
        seg[seg == 0] = 255
        seg = seg - 1
        seg[seg == 254] = 255
    ratio = rng.random() * (2.0 - 0.5) + 0.5
    target = int(scale[0] * ratio), int(scale[1] * ratio)
    h, w = seg.shape
    factor = min(max(target) / max(h, w), min(target) / min(h, w))  # mmcv.rescale_size
    size = int(w * factor + 0.5), int(h * factor + 0.5)
    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)

    def crop_box():
        y = rng.integers(0, max(seg.shape[0] - crop, 0) + 1)
        x = rng.integers(0, max(seg.shape[1] - crop, 0) + 1)
        return slice(y, y + crop), slice(x, x + crop)

    box, rejected = crop_box(), []
    for _ in range(10):
        labels, counts = np.unique(seg[box], return_counts=True)
        kept = counts[labels != 255]
        if len(kept) > 1 and kept.max() / kept.sum() < 0.75:
            break
        rejected.append(len(counts) > 1 and counts.max() / counts.sum() < 0.75)
        box = crop_box()
    bgr, seg = bgr[box], seg[box]
    if rng.random() < 0.5:
        bgr, seg = bgr[:, ::-1], seg[:, ::-1]
    return _mmseg_photometric_cv2(bgr[..., ::-1], rng), seg, rejected


@pytest.mark.parametrize("preset, dataset, scale, crop", [
    ("naive_cityscapes", "cityscapes", (2049, 1025), 768),  # mmseg's cityscapes_768x768.py
    ("pup_pascal_context", "pascal_context", (520, 520), 480),  # SETR's pascal_context.py
    ("mla_pascal_context", "pascal_context59", (520, 520), 480)],  # mmseg's pascal_context_59.py
    ids=["cityscapes", "pascal_context", "pascal_context59"])
def test_training_pipeline_equals_mmseg_description(preset, dataset, scale, crop, cityscapes_root, pascal_parent):
    """The preset's training samples (its scale and crop, wired through train.build) pixel for pixel,
    RandomCrop's cat_max_ratio retry included (the mostly one-class training image)."""
    root = cityscapes_root if dataset == "cityscapes" else pascal_parent
    cfg = parse_config(["--preset", preset, "--dataset", dataset, "--data-root", str(root)], cuda_available=True)
    samples = build_data(cfg).train
    assert (samples.crop_size, samples.scale) == ((crop, crop), scale)
    padded, rejected = 0, []
    for pos in range(4):
        index = samples.dataset_index(pos)
        rng = np.random.default_rng([_AUG_TAG, cfg.seed, pos])  # the RNG of sample position pos
        paths = samples.dataset.image_paths[index], samples.dataset.label_paths[index]
        rgb, seg, rejects = mmseg_train_pipeline(*paths, rng, scale, crop, reduce_zero_label=dataset == "pascal_context59")
        rejected += rejects
        x, y = samples[pos]
        h, w = seg.shape
        assert x.shape == (3, crop, crop) and y.shape == (crop, crop)
        back = x[:, :h, :w].permute(1, 2, 0).double().numpy() * STD + MEAN  # undo the normalization
        assert np.abs(back - np.round(back)).max() < 1e-3
        assert np.array_equal(np.round(back).astype(np.uint8), rgb), (pos, np.abs(np.round(back) - rgb).max())
        assert np.array_equal(y[:h, :w].numpy(), seg)
        assert (x[:, h:] == 0).all() and (x[:, :, w:] == 0).all() and (y[h:] == 255).all() and (y[:, w:] == 255).all()
        padded += h < crop or w < crop
    assert padded  # seed 0, position 1: ratio 0.66, smaller than the crop, padded
    assert rejected, "no crop was re-drawn"
    # where 255 marks the dominant background, some crop was rejected only because 255 is not counted
    assert any(rejected) == (dataset != "pascal_context"), rejected


# ------------------------------------------------------------------ evaluation and prediction
def test_cityscapes_checkpoint_evaluates_and_predicts_at_the_768_test_settings(cityscapes_root, tmp_path, capsys):
    """A checkpoint in the layout of mmseg's released Cityscapes SETR-Naive (pos-embed 48x48 + 1,
    one-conv aux heads, 19 classes) loads strictly; setr.evaluate --dataset cityscapes and setr.predict
    (the dataset known from the 19 classes) give mmseg's test pipeline's label map: (2049, 1025)
    keep-ratio resize, slide 768 / stride 512."""
    from setr.evaluate import main
    from setr.predict import main as predict_main

    ckpt, model = mmseg_format_checkpoint(tmp_path / "setr_naive_tiny_cityscapes.pth", "naive", 19, 768,
                                           aux_num_convs=1)
    assert [k for k in model.state_dict() if k.startswith("auxiliary_head.0.") and k.endswith("conv.weight")] == [
        "auxiliary_head.0.up_convs.0.0.conv.weight"]
    assert main(["--checkpoint", ckpt, "--dataset", "cityscapes", "--data-root", str(cityscapes_root),
                 "--device", "cpu", "--out", str(tmp_path / "eval"), "--save-predictions", "--num-workers", "0"]) == 0
    image = cityscapes_root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000019_leftImg8bit.png"
    assert predict_main([str(image), "--checkpoint", ckpt, "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    ref = mmseg_test_pipeline(model, str(image), scale=(2049, 1025), crop=768, stride=512, num_classes=19)
    for png in (tmp_path / "eval" / "frankfurt_000000_000019_label.png",
                tmp_path / "pred" / "frankfurt_000000_000019_leftImg8bit_label.png"):
        label = Image.open(png)
        assert tuple(label.getpalette()[3:6]) == NAMED_DATASETS["cityscapes"].palette[1]
        label_ties(np.array(label), ref, png)  # equal but for ties (asserted inside)
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_images"] == 1 and len(metrics["IoU"]) == 19 and metrics["class_names"][-1] == "bicycle"
    settings = (metrics["mode"], metrics["crop_size"], metrics["stride"], metrics["scale"])
    assert settings == ("slide", 768, 512, [2049, 1025])
    assert "traffic light" in capsys.readouterr().out


def test_pascal_context_evaluates_and_predicts_at_the_setr_test_settings(pascal_parent, tmp_path, capsys,
                                                                         monkeypatch):
    """setr.evaluate --dataset pascal_context and setr.predict (the dataset known from the 60 classes)
    give the label map of the SETR repository's test pipeline: its Resize(dataset='pascal_context')
    makes the short side 520 (not below the 480 crop), the long one in proportion (mmcv.imrescale):
    the 75x100 image is tested at 520x693 (mmseg's keep-ratio resize into (520, 520) would give
    390x520); slide 480 / stride 320."""
    from setr.evaluate import main
    from setr.predict import main as predict_main

    ckpt, model = mmseg_format_checkpoint(tmp_path / "setr_mla_tiny_pc.pth", "mla", 60, 480)
    args = ["--checkpoint", ckpt, "--dataset", "pascal_context", "--data-root", str(pascal_parent), "--device", "cpu",
            "--num-workers", "0"]
    assert main(args + ["--out", str(tmp_path / "eval"), "--save-predictions"]) == 0
    image = pascal_parent / "VOCdevkit" / "VOC2010" / "JPEGImages" / "2008_000080.jpg"
    assert predict_main([str(image), "--checkpoint", ckpt, "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    # SETR's rule on the 75x100 image: min(520, 520) >= 480, so the short side is 520, imrescaled to
    # (520, 520 * 100 / 75)
    ref = mmseg_test_pipeline(model, str(image), scale=(520, 520 * 100 / 75), crop=480, stride=320, num_classes=60)
    label_ties(np.array(Image.open(tmp_path / "eval" / "2008_000080_label.png")), ref, "eval")
    label_ties(np.array(Image.open(tmp_path / "pred" / "2008_000080_label.png")), ref, "predict")
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    settings = (metrics["crop_size"], metrics["stride"], metrics["scale"], len(metrics["IoU"]))
    assert settings == (480, 320, [520, 520], 60)
    # ms+flip follows the same rule (short side max(int(520 r), 480): test_multi_scale_sizes_follow_each_config)
    calls = []

    def fake_aug(model, image, num_classes, out_size, **kw):
        calls.append(kw)
        return torch.full((1, num_classes, *out_size), 1.0 / num_classes)

    monkeypatch.setattr(setr.inference, "aug_inference", fake_aug)
    assert main(args + ["--out", str(tmp_path / "aug"), "--aug"]) == 0
    assert (calls[0]["scale"], calls[0]["short_min"], calls[0]["crop_size"]) == ((520, 520), 480, (480, 480))
    assert main(args[:3] + ["pascal_context59"] + args[4:] + ["--out", str(tmp_path / "59")]) == 2
    assert "Pascal Context 59 has 59 classes; checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, short_min, size", [("pascal_context", 480, (520, 693)),  # SETR's rule
                                                      ("pascal_context59", 0, (390, 520))])  # mmseg's keep-ratio
def test_training_evaluation_resizes_as_the_dataset_tests(dataset, short_min, size, pascal_parent):
    """The training loop's evaluation samples (train.build) of the 75x100 image, and the rule saved
    in the run's config, for each Pascal Context dataset; an export's saved rule wins over its dataset's."""
    cfg = parse_config(["--preset", "pup_pascal_context", "--dataset", dataset, "--data-root", str(pascal_parent)],
                       cuda_available=True)
    image, label, _ = build_data(cfg).eval[0]
    assert (cfg.eval.short_min, tuple(image.shape), tuple(label.shape)) == (short_min, (3, *size), (75, 100))
    assert short_min_of({}, NAMED_DATASETS[dataset].test) == short_min
    assert short_min_of({"short_min": 7}, NAMED_DATASETS[dataset].test) == 7 and short_min_of({}, None) == 0


def test_multi_scale_sizes_follow_each_config():
    # mmseg 0.x MultiScaleFlipAug on a 1024x2048 Cityscapes image, scale (2049, 1025) (hand-computed:
    # keep-ratio into (int(2049 r), int(1025 r)), mmcv's rounding)
    assert [aug_size(1024, 2048, (2049, 1025), r) for r in MS_RATIOS] == [
        (512, 1024), (768, 1536), (1025, 2049), (1281, 2561), (1537, 3073), (1793, 3585)]
    # SETR's (0acc258) Resize(dataset='pascal_context', multi_scale_test=True) on a 375x500 Pascal
    # Context image: short side 480 if int(520 r) < 480 else int(520 r), the long one in proportion
    assert [aug_size(375, 500, (520, 520), r, short_min=480) for r in MS_RATIOS] == [
        (480, 640), (480, 640), (520, 693), (650, 867), (780, 1040), (910, 1213)]
    assert aug_size(500, 375, (520, 520), 1.0, short_min=480) == (693, 520)  # portrait
    # pascal_context59, mmseg 0.x: keep-ratio into (int(520 r), int(520 r)), no short-side minimum
    assert [aug_size(375, 500, (520, 520), r) for r in MS_RATIOS] == [
        (195, 260), (293, 390), (390, 520), (488, 650), (585, 780), (683, 910)]


# ------------------------------------------------------------------ pos-embed for 768 / 480 crops
@pytest.mark.parametrize("img_size, grid", [(768, 48), (480, 30)])
def test_384_pretrained_pos_embed_is_resized_for_the_crop(img_size, grid):
    """A 384-pretrained ViT (24x24 grid) loads into a model for 768 / 480 crops: bilinear
    (align_corners=False), as mmseg's init_weights, against a float64 reference."""
    from test_data import _bilinear_half_pixel

    sd = tiny_timm_state()
    sd["pos_embed"] = torch.randn(1, 1 + 24 * 24, 128)
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=19, img_size=img_size)
    report = setr.load_timm_vit(model, sd)
    assert f"pos_embed resized from (24, 24) to ({grid}, {grid})" in report["notes"]
    got = model.backbone.pos_embed.detach()[0]
    expected = _bilinear_half_pixel(sd["pos_embed"][0, 1:].reshape(24, 24, 128).double().numpy(), grid, grid)
    assert got.shape == (1 + grid * grid, 128) and torch.equal(got[0], sd["pos_embed"][0, 0])
    # float32 interpolation weights (PyTorch computes the source index in float32): ~1e-6 relative
    np.testing.assert_allclose(got[1:].reshape(grid, grid, 128).numpy(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ presets
PRESET_TABLE = [  # name, head, lr, batch, crop, train scale, test scale, slide stride, classes, aux convs
    ("naive_cityscapes", "naive", 0.01, 8, 768, (2049, 1025), (2049, 1025), 512, 19, 1),
    ("pup_cityscapes", "pup", 0.01, 8, 768, (2049, 1025), (2049, 1025), 512, 19, 2),
    ("mla_cityscapes", "mla", 0.002, 8, 768, (2049, 1025), (2049, 1025), 512, 19, 2),
    ("naive_pascal_context", "naive", 0.01, 16, 480, (520, 520), (520, 520), 320, 60, 2),
    ("pup_pascal_context", "pup", 0.001, 16, 480, (520, 520), (520, 520), 320, 60, 2),
    ("mla_pascal_context", "mla", 0.001, 16, 480, (520, 520), (520, 520), 320, 60, 2),
]


@pytest.mark.parametrize("name, head, lr, batch, crop, scale, test_scale, stride, classes, aux_convs", PRESET_TABLE)
def test_presets_are_the_configs_recipes(name, head, lr, batch, crop, scale, test_scale, stride, classes, aux_convs):
    cfg = get_preset(name)
    assert (cfg.model.head, cfg.model.backbone, cfg.model.num_classes, cfg.model.aux_num_convs) == (
        head, "vit_large", classes, aux_convs)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.head_lr_mult) == (lr, 0.9, 0.0, 10)
    assert (cfg.schedule.batch_size, cfg.schedule.max_iters, cfg.schedule.poly_power, cfg.schedule.min_lr) == (
        batch, 80000, 0.9, 1e-4)
    assert (cfg.data.crop_size, cfg.data.scale, cfg.data.ratio_range, cfg.data.cat_max_ratio) == (
        (crop, crop), scale, (0.5, 2.0), 0.75)
    assert (cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride, cfg.eval.scale) == (
        "slide", (crop, crop), (stride, stride), test_scale)
    assert (cfg.eval.interval, cfg.checkpoint.interval) == (8000, 8000)
    assert cfg.eval.short_min == (480 if classes == 60 else 0)  # SETR's Pascal Context test resize
    assert cfg.parallel.sync_bn and cfg.data.dataset in ("cityscapes", "pascal_context")


def test_preset_dataset_switch_and_missing_root():
    cfg = parse_config(["--preset", "pup_pascal_context", "--dataset", "pascal_context59"], cuda_available=True)
    assert cfg.model.num_classes == 59
    with pytest.raises(ConfigError, match=r"--data-root is required for --dataset pascal_context59 \(the VOCdevkit"):
        cfg.validate()
    cfg = parse_config(["--preset", "naive_cityscapes", "--num-classes", "20", "--data-root", "."], cuda_available=True)
    with pytest.raises(ConfigError, match="Cityscapes has 19 classes and ignore_index 255, got --num-classes 20"):
        cfg.validate()


def test_every_new_preset_trains_on_its_dataset(cityscapes_root, pascal_parent, tmp_path):
    """Each preset's dataset, pipeline and recipe wiring: 2 iterations of a ViT-tiny on 64 crops of
    its fabricated data (the preset's scale), evaluated on one image."""
    from train.main import main

    for name, head, lr, *_, classes, aux_convs in PRESET_TABLE:
        work = tmp_path / name
        root = cityscapes_root if "cityscapes" in name else pascal_parent
        assert main(["--preset", name, "--data-root", str(root), "--device", "cpu", "--backbone", "vit_tiny",
                     "--impl", "eager", "--precision", "fp32", "--crop-size", "64", "--batch-size", "2",
                     "--max-iters", "2", "--num-workers", "0", "--ckpt-interval", "0", "--eval-interval", "0",
                     "--eval.crop_size", "64", "--eval.stride", "64", "--eval.scale", "128,64", "--eval.max_samples",
                     "1", "--log-interval", "1", "--metrics.progress_bar", "off", "--metrics.tensorboard", "false",
                     "--checkpoint.export", "false", "--work-dir", str(work)]
                    + ["--eval.short_min", "64"] * (classes == 60)) == 0  # SETR's rule at the small test scale
        saved = json.load(open(work / "config.json"))
        assert (saved["data"]["dataset"], saved["data"]["scale"], saved["model"]["aux_num_convs"]) == (
            get_preset(name).data.dataset, list(get_preset(name).data.scale), aux_convs)
        export = json.load(open(next(work.glob("checkpoints/*/meta.json"))))["export"]  # what predict reads
        assert saved["eval"]["short_min"] == export["eval"]["short_min"] == (64 if classes == 60 else 0)
        records = [json.loads(line) for line in open(work / "metrics.jsonl")]
        train = [r for r in records if r["event"] == "train"]
        assert [r["iter"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
        assert math.isclose(train[0]["lr"], lr, rel_tol=1e-3)
        assert math.isclose(train[0]["lr_head"], 10 * lr, rel_tol=1e-3)
        assert sum(k.startswith("loss_aux") for k in train[0]) == (4 if head == "mla" else 3)
        assert len([r for r in records if r["event"] == "eval"][-1]["IoU"]) == classes
