"""Inference and evaluation as mmseg's EncoderDecoder does it.

whole: logits of the whole (test-scale) image. slide: crops of crop_size at stride, placed as
mmseg's `slide_inference` places them, logits summed on a canvas and divided by the per-pixel
window count. Either way the logits are resized bilinearly (align_corners=False) to the output
size (the original image size) and turned into softmax probabilities. Multi-scale + flip
(`aug_inference`) averages those probabilities over scales and flips.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from setr.data.transforms import check_crop_size, eval_size, normalize, resize_image, to_pair
from setr.metrics import SegMetric

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def slide_windows(height, width, crop_size=(512, 512), stride=(341, 341)):
    """mmseg slide_inference window placement: list of (y1, y2, x1, x2).

    grids = max(side - crop + stride - 1, 0) // stride + 1 per axis; window i starts at
    i * stride, ends at min(start + crop, side), then starts at max(end - crop, 0). Windows are
    min(crop, side) long, so an image smaller than the crop is one window of its own size.
    """
    ch, cw = crop_size
    sh, sw = stride
    if sh <= 0 or sw <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {stride} larger than crop_size {crop_size} leaves pixels "
                         f"that no window covers")
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * sh + ch, height)
            x2 = min(j * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def _model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def encode_decode(model, images, num_classes):
    """Float32 logits (B, C, h, w) of normalized images (B, 3, h, w) of any size, as mmseg's
    encode_decode: the ViT pads to its patch grid itself (mmseg's PatchEmbed padding='corner') and
    the model resizes the head output once to (h, w)."""
    logits = model(images).float()
    if logits.shape[1] != num_classes:
        raise ValueError(f"model returned {logits.shape[1]} channels, expected num_classes={num_classes}")
    return logits


def slide_logits(model, image, num_classes, crop_size=(512, 512), stride=(341, 341),
                 window_batch=4):
    """Averaged window logits (1, C, h, w) of one normalized image (1, 3, h, w)."""
    _, _, h, w = image.shape
    windows = slide_windows(h, w, crop_size, stride)
    preds = image.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    # Every window has the same size (min(crop, h), min(crop, w)): run them in batches.
    for k in range(0, len(windows), window_batch):
        chunk = windows[k:k + window_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = encode_decode(model, crops, num_classes)
        for (y1, y2, x1, x2), lg in zip(chunk, logits):
            preds[0, :, y1:y2, x1:x2] += lg
            count[0, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def inference(model, image, num_classes, out_size, mode="slide", crop_size=(512, 512),
              stride=(341, 341), window_batch=4):
    """Softmax probabilities (1, C, H, W) at out_size of one normalized image.

    image: (3, h, w) or (1, 3, h, w) float, already normalized (and resized to the test
    scale); out_size: (H, W), normally the original image size; mode: 'slide' or 'whole'.
    The model must be in eval mode and return logits at its input size.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected one image (3, h, w) or (1, 3, h, w), got "
                         f"{tuple(image.shape)}")
    image = image.to(_model_device(model), non_blocking=True)
    if mode == "slide":
        crop_size = check_crop_size(crop_size, name="slide crop_size")
        logits = slide_logits(model, image, num_classes, crop_size, to_pair(stride, "stride"),
                              window_batch)
    elif mode == "whole":
        logits = encode_decode(model, image, num_classes)
    else:
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    out_size = tuple(int(s) for s in out_size)
    if logits.shape[-2:] != out_size:
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)


def aug_size(height, width, scale, ratio, short_min=0):
    """(h, w) of an image in the multi-scale pass of `ratio`: mmseg 0.x MultiScaleFlipAug (under
    which mmseg's published ms+flip numbers were measured, and the SETR repository's) makes the
    scale (int(scale[0] ratio), int(scale[1] ratio)), resized into by the single-scale rule
    (setr.data.transforms.eval_size: keep-ratio; short_min > 0, the SETR repository's)."""
    return eval_size(height, width, (int(scale[0] * ratio), int(scale[1] * ratio)), short_min)


@torch.no_grad()
def aug_inference(model, image, num_classes, out_size=None, scale=(2048, 512),
                  ratios=MS_RATIOS, flip=True, mode="slide", crop_size=(512, 512),
                  stride=(341, 341), window_batch=4, short_min=0):
    """Multi-scale + flip test (mmseg 0.x --aug-test): mean of softmax probabilities.

    image: the original uint8 (H, W, 3) RGB array. For each ratio r the image is rescaled to
    aug_size(H, W, scale, r, short_min), normalized, inferred (and again flipped, with the
    probabilities flipped back), and the probabilities at out_size (default (H, W)) are
    averaged. Returns (1, C, H, W).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"aug_inference takes the original uint8 (H, W, 3) image, got "
                         f"{image.shape} {image.dtype}")
    out_size = image.shape[:2] if out_size is None else tuple(out_size)
    total, passes = None, 0
    for r in ratios:
        size = aug_size(image.shape[0], image.shape[1], scale, r, short_min)
        x = normalize(resize_image(image, size))[None]
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            probs = inference(model, xi, num_classes, out_size, mode, crop_size, stride,
                              window_batch)
            if flipped:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


def _eval_items(eval_dataset, indices, aug, num_workers):
    """(image, label, name) for each index, prefetched by DataLoader workers if asked."""
    if aug:
        get = getattr(eval_dataset, "raw", eval_dataset.__getitem__)
        for i in indices:
            yield get(i)
        return
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(eval_dataset, indices),
                                             batch_size=None, num_workers=num_workers)
        yield from loader
    else:
        for i in indices:
            yield eval_dataset[i]


def evaluate(model, eval_dataset, num_classes, ignore_index=255, mode="slide",
             crop_size=(512, 512), stride=(341, 341), class_names=None, rank=0, world_size=1,
             max_samples=None, aug=False, num_workers=0, autocast_dtype=None, window_batch=4,
             on_prediction=None):
    """mIoU / mAcc / aAcc (percent) of `model` on `eval_dataset` (an EvalSamples).

    Rank r evaluates items r, r + world_size, ... of the first max_samples; the per-class
    counts are summed over ranks (torch.distributed must be initialized when world_size > 1).
    `model` is called a data-dependent number of times per rank, so give a plain module (an
    unsharded copy), never an FSDP one. aug=True: multi-scale + flip (needs eval_dataset.raw).
    on_prediction(name, pred): called per image with its (H, W) int64 class ids on the CPU.
    Returns SegMetric.compute()'s dict (mIoU, mAcc, aAcc, IoU, Acc, per_class, table,
    num_images) plus 'seconds'.
    """
    if world_size > 1 and not torch.distributed.is_initialized():
        raise RuntimeError(f"evaluate(world_size={world_size}) needs torch.distributed "
                           f"initialized")
    if class_names is None:
        class_names = getattr(eval_dataset, "class_names", None)
    metric = SegMetric(num_classes, ignore_index, class_names)
    n = len(eval_dataset) if max_samples is None else min(len(eval_dataset), int(max_samples))
    indices = list(range(rank, n, world_size))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype,
                                             enabled=autocast_dtype is not None):
            for image, label, name in _eval_items(eval_dataset, indices, aug, num_workers):
                label = torch.as_tensor(label)
                if aug:
                    probs = aug_inference(model, image, num_classes, label.shape,
                                          scale=getattr(eval_dataset, "scale", (2048, 512)),
                                          short_min=getattr(eval_dataset, "short_min", 0), mode=mode,
                                          crop_size=crop_size, stride=stride,
                                          window_batch=window_batch)
                else:
                    probs = inference(model, image, num_classes, label.shape, mode, crop_size,
                                      stride, window_batch)
                pred = probs.argmax(dim=1)[0]
                metric.update(pred, label.to(pred.device))
                if on_prediction is not None:
                    on_prediction(name, pred.cpu())
    finally:
        model.train(was_training)
    if world_size > 1:
        metric.all_reduce()
    result = metric.compute()
    result["seconds"] = time.perf_counter() - start
    return result
