"""Semantic segmentation metrics as mmseg computes them (IoUMetric / intersect_and_union).

Per class c, over the whole split (not averaged per image), on pixels whose label is not
ignore_index: intersection I_c = #(pred == c and label == c), pred area P_c, label area L_c,
union U_c = P_c + L_c - I_c.
    IoU_c = I_c / U_c (NaN when U_c == 0: the class is absent from labels and predictions)
    Acc_c = I_c / L_c (NaN when L_c == 0)
    mIoU = nanmean(IoU), mAcc = nanmean(Acc), aAcc = sum(I) / sum(L)
Reported in percent, like mmseg. Counts are int64 (exact at any dataset size).
"""

import math

import numpy as np
import torch
import torch.distributed as dist


def _as_tensor(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor or numpy array, got {type(x).__name__}")
    return x


def _nanmean(values):
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class SegMetric:
    """Accumulates per-class intersection / union over many images.

    update(pred, label): pred and label integer arrays of the same shape ((H, W) or (B, H, W)),
    numpy or torch on any device. all_reduce(): sums the counts over the ranks of the default
    process group (no-op when torch.distributed is not initialized). compute(): the metrics.
    """

    def __init__(self, num_classes, ignore_index=255, class_names=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = (tuple(class_names) if class_names is not None
                            else tuple(f"class{i}" for i in range(num_classes)))
        self.reset()

    def reset(self):
        # rows: intersection, prediction area, label area (int64, CPU)
        self.counts = torch.zeros(3, self.num_classes, dtype=torch.int64)
        self.num_images = 0

    @property
    def area_intersect(self):
        return self.counts[0]

    @property
    def area_label(self):
        return self.counts[2]

    @property
    def area_union(self):
        return self.counts[1] + self.counts[2] - self.counts[0]

    def update(self, pred, label):
        pred, label = _as_tensor(pred), _as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape "
                             f"{tuple(label.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise TypeError(f"pred and label must hold integer class ids, got {pred.dtype} and "
                            f"{label.dtype} (argmax the logits first)")
        label = label.to(pred.device)
        num_images = 1 if label.dim() <= 2 else label.shape[0]
        C = self.num_classes
        keep = label != self.ignore_index
        pred, label = pred[keep].long(), label[keep].long()
        if label.numel():
            lo, hi = int(label.min()), int(label.max())
            if lo < 0 or hi >= C:
                bad = lo if lo < 0 else hi
                raise ValueError(f"label value {bad} is outside [0, {C}) and not ignore_index "
                                 f"{self.ignore_index}")
            lo, hi = int(pred.min()), int(pred.max())
            if lo < 0 or hi >= C:
                raise ValueError(f"predicted class {lo if lo < 0 else hi} is outside [0, {C})")
        intersect = torch.bincount(label[pred == label], minlength=C)
        area_pred = torch.bincount(pred, minlength=C)
        area_label = torch.bincount(label, minlength=C)
        self.counts += torch.stack([intersect, area_pred, area_label]).cpu()
        self.num_images += num_images

    def all_reduce(self):
        """Sum the counts (and image counts) across ranks."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        buf = torch.cat([self.counts.flatten(), torch.tensor([self.num_images])]).to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.cpu()
        self.counts = buf[:-1].view(3, self.num_classes).clone()
        self.num_images = int(buf[-1])
        return self

    def compute(self):
        """{'mIoU', 'mAcc', 'aAcc' (percent), 'IoU', 'Acc' (per class, percent, NaN where
        undefined), 'per_class' (list of dicts), 'table' (str), 'num_images'}."""
        inter = self.area_intersect.double()
        union = self.area_union.double()
        area_label = self.area_label.double()
        iou = (inter / union * 100).tolist()
        acc = (inter / area_label * 100).tolist()
        iou = [float("nan") if u == 0 else v for v, u in zip(iou, union.tolist())]
        acc = [float("nan") if a == 0 else v for v, a in zip(acc, area_label.tolist())]
        total = area_label.sum().item()
        a_acc = inter.sum().item() / total * 100 if total else float("nan")
        per_class = [dict(name=n, IoU=i, Acc=a, intersect=int(x), union=int(u), label_area=int(l))
                     for n, i, a, x, u, l in zip(self.class_names, iou, acc,
                                                 self.area_intersect.tolist(),
                                                 self.area_union.tolist(),
                                                 self.area_label.tolist())]
        result = dict(mIoU=_nanmean(iou), mAcc=_nanmean(acc), aAcc=a_acc, IoU=iou, Acc=acc,
                      per_class=per_class, num_images=self.num_images)
        result["table"] = format_table(result)
        return result


def format_table(result):
    """Per-class IoU / Acc table plus the summary line, as text (mmseg's layout)."""
    rows = [(p["name"], p["IoU"], p["Acc"]) for p in result["per_class"]]
    width = max([len("Class")] + [len(r[0]) for r in rows])

    def fmt(v):
        return "nan" if math.isnan(v) else f"{v:.2f}"

    sep = f"+-{'-' * width}-+--------+--------+"
    lines = [sep, f"| {'Class':>{width}} |  IoU   |  Acc   |", sep]
    lines += [f"| {n:>{width}} | {fmt(i):>6} | {fmt(a):>6} |" for n, i, a in rows]
    lines += [sep, f"aAcc {fmt(result['aAcc'])}  mIoU {fmt(result['mIoU'])}  "
                   f"mAcc {fmt(result['mAcc'])}  ({result['num_images']} images)"]
    return "\n".join(lines)
