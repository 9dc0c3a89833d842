"""Segment images with a trained SETR and write what a person looks at.

    python -m setr.predict IMAGES... --checkpoint CKPT [--head pup] [--out DIR]
        [--backbone vit_large] [--num-classes N] [--mode slide|whole] [--aug] [--device cuda]

Per image: <stem>_label.png (class ids as pixel values, with the class palette attached so a
viewer shows colours) and <stem>_overlay.png (the image blended 50% with the class colours),
both at the original image size. Checkpoints: our single-file export (head, backbone, classes
and names read from its meta) or a plain mmseg SETR checkpoint (head, backbone and number of
classes inferred from its keys unless given), or what training writes: a run directory, a
checkpoints/iter_* directory or checkpoints/latest (the sharded checkpoint is consolidated).
Test pipeline and inference as the config of the checkpoint's dataset (--dataset, else the named
dataset with the checkpoint's number of classes; setr.data.catalog): for ADE20K keep-ratio rescale
into (2048, 512), sliding 512 windows at stride 341, or --aug for multi-scale (0.5-1.75) + flip.
Images are read as mmseg reads them (setr.data.read_image). A model trained on the built-in
synthetic data (the demo preset) knows only synthetic scenes, and the command says so.

Exit status: 0 all written; 2 bad arguments or checkpoint, or an image path that is not a file
(all checked before the model loads); 1 some images failed: a file that cannot be decoded
(damaged, not an image) or whose outputs cannot be written is named, the others are still done.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

# torch-free imports only (setr imports its model lazily): the arguments are parsed, and --help
# answered, before torch loads; the functions below import the rest where they need it.
import setr
from setr import cli
from setr.constants import BACKBONES, HEADS, IMPLS, PATCH_SIZE, VIT_CONFIGS
from setr.data.catalog import NAMED_DATASETS, dataset_with_classes, short_min_of
from setr.data.datasets import DataError, random_palette, read_image
from setr.files import check_writable_dir
from setr.run_dir import model_source, read_sharded_model

SYNTHETIC_NOTE = ("was trained on the built-in synthetic data (the demo preset): it knows only synthetic "
                  "scenes (textured shapes), so its labels for real photos mean nothing")


class PredictError(Exception):
    """A problem the user must fix (bad checkpoint, option, output folder)."""


def _load_checkpoint(path):
    """(checkpoint dict, our export's meta or {}, state dict) of what `path` names: a checkpoint
    file, or a training run's directory, checkpoints/iter_* or checkpoints/latest (its sharded
    checkpoint consolidated here)."""
    from setr.weights import read_checkpoint, read_checkpoint_meta

    try:
        source = model_source(path)
        obj = read_sharded_model(source) if os.path.isdir(source) else source
        obj, state = read_checkpoint(obj)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        raise PredictError(str(e)) from None
    return obj, read_checkpoint_meta(obj), state


def _infer_from_keys(state):
    """(head, embed_dims, num_classes, img_size) guessed from a plain mmseg state dict."""
    head = None
    if any(k.startswith("neck.") for k in state):
        head = "mla"
    elif "decode_head.up_convs.3.0.conv.weight" in state:
        head = "pup"
    elif "decode_head.up_convs.0.0.conv.weight" in state:
        head = "naive"
    w = state.get("backbone.patch_embed.projection.weight")  # every value is a tensor (read_checkpoint)
    dims = int(w.shape[0]) if w is not None else None
    w = state.get("decode_head.conv_seg.weight")
    num_classes = int(w.shape[0]) if w is not None else None
    pos = state.get("backbone.pos_embed")
    img_size = None
    if pos is not None and pos.dim() == 3:
        side = int(round((pos.shape[1] - 1) ** 0.5))
        if side * side == pos.shape[1] - 1:
            img_size = side * PATCH_SIZE
    return head, dims, num_classes, img_size


def build_model(checkpoint, head=None, backbone=None, num_classes=None, device="cpu",
                impl="eager", dataset=None):
    """Build and strictly load the model of a checkpoint.

    dataset: the dataset the checkpoint is for; None: the one our export names, else the named
    dataset (setr.data.catalog) with its number of classes, if any. A named dataset gives the class
    names, palette and test settings that a checkpoint does not carry.
    Returns (model in eval mode on device, info dict with head, backbone, num_classes, img_size,
    class_names, palette, eval (the export's test settings), test (the dataset's), short_min (the
    test resize's rule: catalog.short_min_of)).
    """
    if num_classes is not None and num_classes < 1:
        raise PredictError(f"--num-classes must be >= 1, got {num_classes}")
    obj, meta, state = _load_checkpoint(checkpoint)
    key_head, dims, key_classes, key_img = _infer_from_keys(state)
    if head is not None and meta.get("head") not in (None, head):
        raise PredictError(f"checkpoint {checkpoint} holds a {meta['head']!r} model, --head is "
                           f"{head!r}")
    head = head or meta.get("head") or key_head
    if head is None:
        raise PredictError(f"checkpoint {checkpoint}: cannot tell the head from its keys; pass "
                           f"--head naive|pup|mla")
    if backbone is None:
        backbone = meta.get("backbone")
    if backbone is None:
        matches = [n for n, c in VIT_CONFIGS.items() if c["embed_dims"] == dims]
        backbone = matches[0] if len(matches) == 1 else "vit_large"
    if num_classes is None:
        num_classes = meta.get("num_classes") or key_classes or 150
    img_size = meta.get("img_size") or key_img or 512
    if isinstance(img_size, list):
        img_size = tuple(img_size)
    kwargs = {k: meta[k] for k in ("patch_bias", "ignore_index", "aux_num_convs") if k in meta}
    if "aux_num_convs" not in kwargs and "auxiliary_head.0.up_convs.0.0.conv.weight" in state:
        kwargs["aux_num_convs"] = 2 if "auxiliary_head.0.up_convs.1.0.conv.weight" in state else 1
    try:
        model = setr.build_setr(head, backbone=backbone, num_classes=num_classes,
                                img_size=img_size, impl=impl, **kwargs)
        setr.load_mmseg_checkpoint(model, obj, strict=True)
    except ValueError as e:
        lines = [line.strip() for line in str(e).splitlines() if "strict=False" not in line]  # API-only advice
        report = "; ".join(lines[1:] or lines)  # the key report, without its "checkpoint <state dict> ..." title
        raise PredictError(f"checkpoint {checkpoint}: cannot load into a {head!r} {backbone} "
                           f"model with {num_classes} classes: {report}") from None
    if dataset is None:  # our exports name their dataset; a plain mmseg checkpoint: guess from its classes
        dataset = meta.get("dataset") if meta.get("dataset") in NAMED_DATASETS else dataset_with_classes(num_classes)
    named = NAMED_DATASETS.get(dataset)
    if named and named.num_classes != num_classes:
        raise PredictError(f"{named.title} has {named.num_classes} classes; checkpoint {checkpoint} has {num_classes}")
    class_names = meta.get("class_names") or (named.classes if named else None)
    palette = meta.get("palette") or (named.palette if named else random_palette(num_classes))
    saved_eval = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
    info = dict(head=head, backbone=backbone, num_classes=num_classes, img_size=img_size,
                class_names=class_names, palette=palette, dataset=meta.get("dataset"),
                test=named.test if named else None, eval=saved_eval,
                short_min=short_min_of(saved_eval, named.test if named else None))
    return model.to(device).eval(), info


def colorize(label, palette):
    """(H, W) class ids -> (H, W, 3) uint8 colours; ids outside the palette are black."""
    table = np.zeros((max(len(palette), int(label.max()) + 1), 3), dtype=np.uint8)
    table[:len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[label]


def save_label(label, palette, path):
    """Write (H, W) class ids as a PNG: the ids are the pixel values (8-bit with the palette
    attached, so viewers show colours; 16-bit grey beyond 256 classes)."""
    if len(palette) <= 256:
        im = Image.fromarray(label.astype(np.uint8))  # mode L: the ids themselves
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[:len(palette)] = np.asarray(palette, dtype=np.uint8)
        im.putpalette(flat.ravel().tolist())  # L -> P, pixel values unchanged
    else:
        im = Image.fromarray(label.astype(np.uint16))
    im.save(path)
    return path


def save_outputs(image, label, palette, out_dir, stem):
    """Write <stem>_label.png and <stem>_overlay.png into out_dir (created if need be); returns their paths.

    image: (H, W, 3) uint8; label: (H, W) class ids.
    """
    os.makedirs(out_dir, exist_ok=True)
    label_path = save_label(label, palette, os.path.join(out_dir, f"{stem}_label.png"))
    overlay_path = os.path.join(out_dir, f"{stem}_overlay.png")
    colour = colorize(label, palette)
    overlay = (image.astype(np.uint16) + colour.astype(np.uint16) + 1) // 2
    Image.fromarray(overlay.astype(np.uint8)).save(overlay_path)
    return label_path, overlay_path


def predict_image(model, image, num_classes, mode="slide", aug=False, scale=(2048, 512),
                  crop_size=(512, 512), stride=(341, 341), short_min=0):
    """(H, W) uint8/int64 class ids of one uint8 (H, W, 3) RGB image."""
    from setr.data.transforms import eval_transform
    from setr.inference import MS_RATIOS, aug_inference, inference

    out_size = image.shape[:2]
    if aug:
        probs = aug_inference(model, image, num_classes, out_size, scale, MS_RATIOS, True, mode,
                              crop_size, stride, short_min=short_min)
    else:
        probs = inference(model, eval_transform(image, scale, short_min), num_classes, out_size, mode,
                          crop_size, stride)
    return probs.argmax(dim=1)[0].cpu().numpy()


def add_model_args(p):
    """Flags shared with setr.evaluate: the checkpoint, the model, the test pipeline, the device."""
    p.add_argument("--checkpoint", required=True,
                   help="our export, an mmseg SETR checkpoint, or what training writes: a run's "
                        "directory, checkpoints/iter_* or checkpoints/latest")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="decode head (default: from the checkpoint)")
    p.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="default: from the checkpoint, else vit_large")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: from the checkpoint, else 150")
    p.add_argument("--mode", choices=("slide", "whole"), default=None,
                   help="default: the checkpoint's evaluation mode, else slide")
    p.add_argument("--aug", action="store_true", help="multi-scale (0.5-1.75, the dataset's rule) + flip")
    p.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="test scale, keep ratio (default: the checkpoint's, else its dataset's, else 2048 512)")
    p.add_argument("--crop-size", type=int, default=None,
                   help="slide window (default: the checkpoint's, else its dataset's, else its img_size)")
    p.add_argument("--stride", type=int, default=None,
                   help="slide stride (default: the checkpoint's, else its dataset's, else 2/3 crop)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--impl", choices=IMPLS, default="sdpa",
                   help="op implementations (default sdpa)")


def pipeline_settings(args, info):
    """(mode, scale, crop, stride) from the flags, else what the exported checkpoint was
    evaluated with, else its dataset's test settings (setr.data.catalog), else a keep-ratio
    resize into (2048, 512) and windows of the model's img_size at 2/3 stride. Raises
    PredictError on bad values."""
    from setr.data.transforms import check_crop_size

    test = info["test"]
    saved = info["eval"] or (dict(scale=test.scale, crop_size=[test.crop_size], stride=[test.stride]) if test else {})
    img_size = info["img_size"]
    mode = args.mode or saved.get("mode", "slide")
    scale = tuple(args.scale or saved.get("scale", (2048, 512)))
    crop, stride = args.crop_size, args.stride
    if crop is None:
        crop = max(saved.get("crop_size") or [img_size if isinstance(img_size, int) else max(img_size)])
    if stride is None:  # the saved stride goes with the saved crop only
        stride = max(saved["stride"]) if args.crop_size is None and saved.get("stride") else max(crop * 2 // 3, 1)
    try:
        check_crop_size(crop, name="--crop-size")
        if min(scale) < 1:
            raise ValueError(f"--scale must be two positive sizes (long short), got {' '.join(map(str, scale))}")
        if not 0 < stride <= crop:
            raise ValueError(f"--stride must be in [1, crop size {crop}], got {stride}")
    except ValueError as e:
        raise PredictError(str(e)) from None
    return mode, scale, crop, stride


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m setr.predict", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    add_model_args(p)
    p.add_argument("--dataset", choices=tuple(NAMED_DATASETS), default=None,
                   help="the dataset the checkpoint is for: its classes, palette and test settings "
                        "(default: the one with the checkpoint's number of classes)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    return p.parse_args(argv)


def resolve_device(name):
    """--device value (None: cuda when available, else cpu) -> a device string; PredictError if unusable."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PredictError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PredictError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name}: CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PredictError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def check_output_dir(path):
    """Prove, before any model loads, that --out can be created and written. It is created when the
    first output is written: a refused start leaves no empty folder behind."""
    try:
        check_writable_dir(path)
    except OSError as e:
        raise PredictError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def check_images(paths):
    """Every image path names a file, and no two write the same outputs; PredictError if not."""
    stems = {}
    for path in paths:
        if not os.path.isfile(path):
            raise PredictError(f"image {path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise PredictError(f"images {stems[stem]} and {path} would write the same "
                               f"outputs {stem}_*.png; rename one")
        stems[stem] = path


def predict(args):
    """Segment args.images; returns the exit code. Raises PredictError before any image is done."""
    check_images(args.images)
    check_output_dir(args.out)
    device = resolve_device(args.device)
    model, info = build_model(args.checkpoint, args.head, args.backbone, args.num_classes, device, args.impl,
                              args.dataset)
    mode, scale, crop, stride = pipeline_settings(args, info)
    if info["dataset"] == "synthetic":
        print(f"note: {args.checkpoint} {SYNTHETIC_NOTE}", file=sys.stderr)
    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except DataError as e:
            cli.error(f"cannot read image {e.path}: {e.problem}")
            failed += 1
            continue
        label = predict_image(model, image, info["num_classes"], mode, args.aug, scale, (crop, crop),
                              (stride, stride), info["short_min"])
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            outs = save_outputs(image, label, info["palette"], args.out, stem)
        except OSError as e:  # disk full, folder removed meanwhile
            cli.error(f"cannot write the outputs of {path} to {args.out} ({e.strerror or e})")
            failed += 1
            continue
        print(f"{path}: {' '.join(outs)}")
    if failed:
        print(f"{failed} of {len(args.images)} images failed", file=sys.stderr)
        return cli.FAILED
    return 0


def main(argv=None):
    args = parse_args(argv)
    return cli.run("setr.predict", lambda: predict(args), PredictError)


if __name__ == "__main__":
    sys.exit(main())
