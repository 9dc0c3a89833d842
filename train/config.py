"""One typed training config: a dataclass tree, presets named after mmseg's SETR configs, CLI.

Presets (`--preset`, or picked by `--head` when no preset is given):

    naive   setr_vit-l_naive_8xb2-160k_ade20k-512x512   lr 0.01,  batch 16, 160k iters
    pup     setr_vit-l_pup_8xb2-160k_ade20k-512x512     lr 0.001, batch 16, 160k iters
    mla     setr_vit-l_mla_8xb2-160k_ade20k-512x512     lr 0.001, batch 16, 160k iters
    mla_b8  setr_vit-l-mla_8xb1-160k_ade20k-512x512     lr 0.001, batch 8,  160k iters
    naive_cityscapes  setr_vit-l_naive_8xb1-80k_cityscapes-768x768   lr 0.01,  batch 8, 80k iters
    pup_cityscapes    setr_vit-l_pup_8xb1-80k_cityscapes-768x768     lr 0.01,  batch 8, 80k iters
    mla_cityscapes    setr_vit-l_mla_8xb1-80k_cityscapes-768x768     lr 0.002, batch 8, 80k iters
    naive_pascal_context  SETR_Naive_480x480_80k_pascal_context_bs_16  lr 0.01,  batch 16, 80k iters
    pup_pascal_context    SETR_PUP_480x480_80k_pascal_context_bs_16    lr 0.001, batch 16, 80k iters
    mla_pascal_context    SETR_MLA_480x480_80k_pascal_context_bs_16    lr 0.001, batch 16, 80k iters
                      (the SETR repository's configs: mmseg has no SETR Pascal Context config; the
                      models are mmseg's, 60 classes as the paper scores them)
    demo    ViT-tiny on the built-in synthetic data, 64x64 crops, fp32: a few minutes on 2 CPU
            cores. Chosen automatically on a machine without a GPU when --preset is not given.

Every field can be overridden with `--section.field value` (e.g. `--optim.momentum 0.8`), and
the common ones have short flags (`--lr`, `--batch-size`, `--data-root`, ...; `--help` shows
each one's default per preset). The resolved config is written to `<work_dir>/config.json`.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field

# torch-free imports only: `--help` and usage errors answer before torch is loaded
from setr.constants import BACKBONES, HEADS, IMPLS, PATCH_SIZE, RECOMPUTE
from setr.data.catalog import IGNORE_INDEX, NAMED_DATASETS
from setr.data.datasets import DATASETS
from setr.files import is_hub_id, write_atomic

PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and what is expected."""


@dataclass
class ModelConfig:
    head: str = "pup"
    backbone: str = "vit_large"
    num_classes: int = 150
    ignore_index: int = 255
    impl: str = "triton"  # eager | sdpa | triton (our kernels)
    aux: bool = True  # auxiliary heads (loss weight 0.4 each, as mmseg)
    aux_num_convs: int = 2  # conv stages of the Naive / PUP aux heads (1: mmseg's Naive Cityscapes config)
    pretrained: str = ""  # timm ViT weights (file or timm/<model> on the hub) loaded into the backbone


@dataclass
class DataConfig:
    dataset: str = "ade20k"  # ade20k | cityscapes | pascal_context | pascal_context59 | folder | synthetic
    root: str = ""
    reduce_zero_label: typing.Optional[bool] = None  # folder datasets: label 0 -> ignore, k -> k-1
    crop_size: typing.Tuple[int, int] = (512, 512)
    scale: typing.Tuple[int, int] = (2048, 512)  # RandomResize base scale (long, short)
    ratio_range: typing.Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    num_workers: int = 4
    on_bad_sample: str = "error"  # error | skip (warn once per file, replace by the next item)
    max_bad_fraction: float = 0.01  # skip: stop when more of the training split is bad
    synthetic_size: typing.Tuple[int, int] = (128, 160)  # (H, W) of synthetic images
    synthetic_train_samples: int = 512
    synthetic_val_samples: int = 64


@dataclass
class OptimConfig:
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    head_lr_mult: float = 10.0  # for parameter names containing "head" (mmseg custom_keys)
    clip_grad: float = 0.0  # max global grad norm; 0 = off (mmseg: off)


@dataclass
class ScheduleConfig:
    """Poly lr per param group, lr(t) = (lr0 - min_lr) * (1 - t / max_iters)^poly_power + min_lr, as mmcv
    0.x's PolyLrUpdaterHook, which trained the released checkpoints (kept on purpose: mmengine's
    PolyLR(end=160000) reaches min_lr at iteration 159,999, total_iters = end - begin - 1)."""
    max_iters: int = 160000
    batch_size: int = 16  # global batch (all ranks, all micro-batches)
    micro_batch_size: int = 0  # images per rank per forward; 0 = the whole per-rank batch
    poly_power: float = 0.9
    min_lr: float = 1e-4


@dataclass
class ParallelConfig:
    precision: str = "bf16"  # fp32 | bf16 (FSDP params bf16, reduce fp32) | fp16 (+ loss scaling)
    # none | selective | full (RECOMPUTE). selective by measurement: SETR-PUP b16 bf16 planned per image
    # (bench/memory_plan.plan with this policy) eager 3.24 -> 3.08, sdpa 2.49 -> 2.19, triton 1.16 -> 0.86
    # GiB for no extra matmul / conv FLOPs (it re-runs ~160 M elementwise / resize elements per image);
    # full: 1.72 / 1.72 / 0.39 GiB for +17.5% FLOPs (2948 -> 3464 GFLOP per image, FlopCounterMode)
    recompute: str = "selective"
    compile: bool = False
    sync_bn: bool = True  # heads' BatchNorm statistics over all ranks (mmseg SyncBN)


@dataclass
class CheckpointConfig:
    interval: int = 16000
    keep_last: int = 3  # complete checkpoints kept (older ones removed)
    resume: str = ""  # "" | auto | path to a checkpoint dir (or a work dir)
    export: bool = True  # consolidated single-file model at the end (work_dir/model_final.pth)
    overwrite: bool = False  # delete the run already in work_dir and start from scratch


@dataclass
class EvalConfig:
    interval: int = 16000  # 0 = only at the end
    mode: str = "slide"  # slide | whole
    crop_size: typing.Tuple[int, int] = (512, 512)
    stride: typing.Tuple[int, int] = (341, 341)
    scale: typing.Tuple[int, int] = (2048, 512)
    short_min: int = 0  # > 0: the SETR repository's Pascal Context resize (short side >= it; setr.data.catalog)
    max_samples: int = 0  # 0 = the whole validation split
    at_end: bool = True


@dataclass
class MetricsConfig:
    log_interval: int = 50
    tensorboard: bool = True  # when the tensorboard package is installed
    progress_bar: str = "auto"  # auto (on a terminal) | on | off


@dataclass
class ProfilerConfig:
    memory_snapshot: bool = False  # CUDA memory history, dumped to work_dir/memory_snapshot/
    snapshot_iters: int = 3  # dump after this many iterations (and on OOM)


@dataclass
class Config:
    preset: str = "pup"
    work_dir: str = "work_dirs/setr"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    notes: typing.List[str] = field(default_factory=list)  # how the preset was chosen, etc.

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def batch_layout(self, world_size):
        """(per-rank batch, micro-batch, accumulation steps) for this world size."""
        b, mb = self.schedule.batch_size, self.schedule.micro_batch_size
        per_rank = b // world_size
        mb = mb or per_rank
        return per_rank, mb, per_rank // mb

    def validate(self, world_size=1):
        """Raise ConfigError naming the first field that cannot work."""
        m, d, o, s, c, e = self.model, self.data, self.optim, self.schedule, self.checkpoint, self.eval
        self.check_choices()
        if m.num_classes < 2:
            raise ConfigError(f"model.num_classes (--num-classes) must be >= 2, got {m.num_classes}")
        if not 0 <= m.ignore_index <= 255 or m.ignore_index < m.num_classes:
            raise ConfigError(f"model.ignore_index (--ignore-index) must be in [num_classes={m.num_classes}, "
                              f"255] (labels are 8-bit PNGs), got {m.ignore_index}")
        if m.aux_num_convs not in (1, 2):
            raise ConfigError(f"model.aux_num_convs must be 1 or 2 (mmseg's SETR configs), got {m.aux_num_convs}")
        named = NAMED_DATASETS.get(d.dataset)
        if named and (m.num_classes, m.ignore_index) != (named.num_classes, IGNORE_INDEX):
            raise ConfigError(f"{named.title} has {named.num_classes} classes and ignore_index {IGNORE_INDEX}, got "
                              f"--num-classes {m.num_classes} --ignore-index {m.ignore_index}")
        for name, size in (("data.crop_size (--crop-size)", d.crop_size), ("eval.crop_size", e.crop_size)):
            if len(size) != 2 or min(size) <= 0 or size[0] % PATCH_SIZE or size[1] % PATCH_SIZE:
                raise ConfigError(f"{name} must be two positive multiples of the patch size {PATCH_SIZE} "
                                  f"(the ViT tokenizes {PATCH_SIZE}x{PATCH_SIZE} patches), got {tuple(size)}")
        if d.dataset != "synthetic":
            if not d.root:
                raise ConfigError(f"--data-root is required for --dataset {d.dataset} ("
                                  f"{named.root if named else 'the folder holding images/ and annotations/'}); "
                                  f"use --dataset synthetic for the built-in data")
            if not os.path.isdir(d.root):
                raise ConfigError(f"--data-root {d.root!r}: no such directory")
        if d.dataset == "synthetic":
            if d.root:
                raise ConfigError(f"--data-root {d.root!r} is not used by --dataset synthetic (the built-in "
                                  f"data); pass --dataset ade20k or --dataset folder to train on it")
            if len(d.synthetic_size) != 2 or min(d.synthetic_size) < 16:
                raise ConfigError(f"data.synthetic_size must be two sizes >= 16 (H,W: setr.data.SyntheticSegmentation "
                                  f"draws its shapes at least that large), got {tuple(d.synthetic_size)}")
            for name, value in (("data.synthetic_train_samples", d.synthetic_train_samples),
                                ("data.synthetic_val_samples", d.synthetic_val_samples)):
                if value < 1:
                    raise ConfigError(f"{name} must be >= 1 (images in the split), got {value}")
        if m.pretrained and not is_hub_id(m.pretrained) and not os.path.isfile(m.pretrained):
            raise ConfigError(f"--pretrained {m.pretrained!r}: no such file (a .safetensors / .pth / .bin file, "
                              f"or timm/<model> from the Hugging Face hub)")
        if not 0 <= d.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
        if s.max_iters < 1:
            raise ConfigError(f"schedule.max_iters (--max-iters) must be >= 1, got {s.max_iters}")
        if s.batch_size < 1 or s.batch_size % world_size:
            raise ConfigError(f"schedule.batch_size (--batch-size) {s.batch_size} is not divisible by "
                              f"the world size {world_size} (the global batch is split evenly "
                              f"across ranks)")
        per_rank = s.batch_size // world_size
        if s.micro_batch_size < 0 or (s.micro_batch_size and per_rank % s.micro_batch_size):
            raise ConfigError(f"schedule.micro_batch_size (--micro-batch-size) {s.micro_batch_size} "
                              f"must divide the per-rank batch {per_rank} (= {s.batch_size} / "
                              f"{world_size} ranks)")
        for name, value, expected, ok in (("optim.lr (--lr)", o.lr, "> 0", o.lr > 0),
                                          ("schedule.min_lr", s.min_lr, ">= 0", s.min_lr >= 0),
                                          ("optim.clip_grad (--clip-grad, 0 = off)", o.clip_grad, ">= 0",
                                           o.clip_grad >= 0),
                                          ("optim.momentum", o.momentum, "in [0, 1)", 0 <= o.momentum < 1),
                                          ("optim.weight_decay", o.weight_decay, ">= 0", o.weight_decay >= 0),
                                          ("optim.head_lr_mult", o.head_lr_mult, "> 0", o.head_lr_mult > 0),
                                          ("schedule.poly_power", s.poly_power, "> 0", s.poly_power > 0)):
            if not (math.isfinite(value) and ok):  # nan fails every comparison; inf is not finite
                raise ConfigError(f"{name} must be a finite number {expected}, got {value}")
        for name, value, least in (("metrics.log_interval (--log-interval)", self.metrics.log_interval, 1),
                                   ("eval.interval (--eval-interval, 0 = only at the end)", e.interval, 0),
                                   ("checkpoint.interval (--ckpt-interval, 0 = only at the end)", c.interval, 0),
                                   ("checkpoint.keep_last", c.keep_last, 1), ("eval.short_min", e.short_min, 0)):
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if c.resume not in ("", "auto") and not os.path.exists(c.resume):
            raise ConfigError(f"--resume {c.resume!r}: no such checkpoint (expected 'auto' or a "
                              f"checkpoint directory)")
        return self

    def check_choices(self):
        """Raise ConfigError for a name that is not one of its field's choices (CHOICES)."""
        for dotted, choices in CHOICES.items():
            value = _get(self, dotted)
            if value not in choices:
                flag = next((f" (--{k.replace('_', '-')})" for k, v in SHORT_FLAGS.items() if v == dotted), "")
                raise ConfigError(f"unknown {dotted}{flag} {value!r}; expected one of {tuple(choices)}")


# ----------------------------------------------------------------------------------------------
# Presets: plain instances, the recipes of mmseg's SETR configs (the SETR repository's for Pascal
# Context). The test settings come from setr.data.catalog.
# ----------------------------------------------------------------------------------------------

def _ade20k_preset(head, lr, batch_size=16):
    cfg = Config(preset=head if batch_size == 16 else f"{head}_b{batch_size}")
    cfg.model.head = head
    cfg.optim.lr = lr
    cfg.schedule.batch_size = batch_size
    return cfg


def _demo_preset():
    cfg = Config(preset="demo", work_dir="work_dirs/demo")
    cfg.model = ModelConfig(head="pup", backbone="vit_tiny", num_classes=8, impl="eager")
    cfg.data = DataConfig(dataset="synthetic", crop_size=(64, 64), scale=(256, 64), num_workers=1,
                          synthetic_size=(96, 128), synthetic_train_samples=512,
                          synthetic_val_samples=32)
    # A from-scratch ViT-tiny barely moves at mmseg's lr 0.001 in a few hundred steps; 0.02
    # (head x10 = 0.2) learns the synthetic classes quickly and stays stable (measured: mIoU
    # ~48 after 200 iterations, ~59 after 500, 8 classes; 0.01 gives ~55 after 400).
    cfg.optim.lr = 0.02
    cfg.schedule = ScheduleConfig(max_iters=500, batch_size=8)
    cfg.parallel.precision = "fp32"
    cfg.checkpoint = CheckpointConfig(interval=250, keep_last=2)
    cfg.eval = EvalConfig(interval=250, crop_size=(64, 64), stride=(43, 43), scale=(256, 64))
    cfg.metrics.log_interval = 20
    return cfg


def _benchmark_preset(head, dataset, lr, batch_size, aux_num_convs=2):
    """An 80k-iteration SETR recipe on Cityscapes or Pascal Context: evaluation and checkpoints every
    8k; training crops and scale are the dataset's test settings' (setr.data.catalog: each config
    sets them once for both pipelines); like every SETR config, SGD momentum 0.9, weight decay 0,
    head lr x10, poly 0.9 to 1e-4."""
    cfg = Config(preset=f"{head}_{dataset}")
    named = NAMED_DATASETS[dataset]
    cfg.model = ModelConfig(head=head, num_classes=named.num_classes, aux_num_convs=aux_num_convs)
    cfg.data = DataConfig(dataset=dataset, crop_size=(named.test.crop_size,) * 2, scale=named.test.scale)
    cfg.optim.lr = lr
    cfg.schedule = ScheduleConfig(max_iters=80000, batch_size=batch_size)
    cfg.checkpoint.interval = 8000
    cfg.eval = EvalConfig(interval=8000, crop_size=(named.test.crop_size,) * 2, stride=(named.test.stride,) * 2,
                          scale=named.test.scale, short_min=named.test.short_min)
    return cfg


# mmseg configs/setr/setr_vit-l_<head>_8xb1-80k_cityscapes-768x768.py: 8 GPUs x 1 image, crops of 768
# from the cityscapes_768x768 base's (2049, 1025) scale; lr 0.01 from schedule_80k (MLA's config:
# 0.002). PUP's config sets its aux heads (2 convs); Naive's keeps the base model's (1 conv).
_cityscapes = dict(dataset="cityscapes", batch_size=8)
# fudan-zvg/SETR configs/SETR/SETR_<Head>_480x480_80k_pascal_context_bs_16.py: crops of 480 from
# (520, 520), 60 classes (background included, as the paper scores them). Batch 16 as its README
# says: the PUP and MLA configs set 2 per GPU (x 8 GPUs); the Naive one sets none, so it would run
# its base's 4 per GPU (32). The models are mmseg's, as for ADE20K, trained on SETR's recipe (the
# SETR repository's own heads differ: README.md).
_pascal_context = dict(dataset="pascal_context", batch_size=16)

PRESETS = {
    "naive": lambda: _ade20k_preset("naive", 0.01),
    "pup": lambda: _ade20k_preset("pup", 0.001),
    "mla": lambda: _ade20k_preset("mla", 0.001),
    "mla_b8": lambda: _ade20k_preset("mla", 0.001, batch_size=8),
    "naive_cityscapes": lambda: _benchmark_preset("naive", lr=0.01, aux_num_convs=1, **_cityscapes),
    "pup_cityscapes": lambda: _benchmark_preset("pup", lr=0.01, **_cityscapes),
    "mla_cityscapes": lambda: _benchmark_preset("mla", lr=0.002, **_cityscapes),
    "naive_pascal_context": lambda: _benchmark_preset("naive", lr=0.01, **_pascal_context),
    "pup_pascal_context": lambda: _benchmark_preset("pup", lr=0.001, **_pascal_context),
    "mla_pascal_context": lambda: _benchmark_preset("mla", lr=0.001, **_pascal_context),
    "demo": _demo_preset,
}


def get_preset(name):
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

# short flag -> dotted field
SHORT_FLAGS = {
    "head": "model.head", "backbone": "model.backbone", "num_classes": "model.num_classes",
    "ignore_index": "model.ignore_index", "impl": "model.impl", "pretrained": "model.pretrained",
    "dataset": "data.dataset", "data_root": "data.root", "crop_size": "data.crop_size",
    "num_workers": "data.num_workers",
    "lr": "optim.lr", "clip_grad": "optim.clip_grad",
    "max_iters": "schedule.max_iters", "batch_size": "schedule.batch_size",
    "micro_batch_size": "schedule.micro_batch_size",
    "precision": "parallel.precision", "recompute": "parallel.recompute", "compile": "parallel.compile",
    "ckpt_interval": "checkpoint.interval", "resume": "checkpoint.resume", "overwrite": "checkpoint.overwrite",
    "eval_interval": "eval.interval", "log_interval": "metrics.log_interval",
}
# the fields whose value is one of a few names (checked by Config.check_choices)
CHOICES = {"preset": tuple(PRESETS), "device": ("auto", "cpu", "cuda"), "model.head": HEADS,
           "model.backbone": BACKBONES, "model.impl": IMPLS, "data.dataset": DATASETS,
           "parallel.precision": PRECISIONS, "parallel.recompute": RECOMPUTE, "eval.mode": ("slide", "whole"),
           "metrics.progress_bar": ("auto", "on", "off"), "data.on_bad_sample": ("error", "skip")}


def _fields(cls, prefix=""):
    """(dotted name, type) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _fields(t, f"{prefix}{f.name}.")
        elif f.name not in ("preset", "notes"):
            yield prefix + f.name, t


def _parse_bool(text):
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _converter(t):
    """argparse type function for a field type; tuples are given as '512,512' or '512'."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:  # Optional[X]
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda s: None if s.lower() in ("none", "null", "") else inner(s)
    if origin in (tuple, typing.Tuple):
        conv = args[0]

        def parse_tuple(s):
            parts = [conv(x) for x in s.replace("x", ",").split(",") if x.strip()]
            if len(parts) == 1:
                parts = parts * len(args)
            if len(parts) != len(args):
                raise argparse.ArgumentTypeError(f"expected {len(args)} comma-separated values, got {s!r}")
            return tuple(parts)
        return parse_tuple
    if t is bool:
        return _parse_bool
    return t


def _default_help(dotted):
    """' (default X)' for --help, X the default preset's (pup), with the presets that differ:
    ' (default 150; *_cityscapes: 19; demo: 8)'."""
    groups = {}
    for name in PRESETS:
        value = _get(get_preset(name), dotted)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else \
            str(value).lower() if isinstance(value, bool) else str(value) or "none"
        groups.setdefault(text, []).append(name)
    (common, _), *others = sorted(groups.items(), key=lambda item: ("pup" not in item[1], -len(item[1])))
    return f" (default {common}" + "".join(f"; {_preset_names(names)}: {v}" for v, names in others) + ")"


def _preset_names(names):
    """'naive_cityscapes/pup_cityscapes/mla_cityscapes/demo' -> '*_cityscapes/demo': a dataset's
    presets written once when every head's is in the group."""
    for suffix in dict.fromkeys(n.split("_", 1)[1] for n in names if "_" in n):
        family = [f"{head}_{suffix}" for head in HEADS]
        if all(f in names for f in family):
            names = [f"*_{suffix}" if n == family[0] else n for n in names if n not in family[1:]]
    return "/".join(names)


class _Parser(argparse.ArgumentParser):
    """Under torchrun every rank parses the command line: usage and errors are printed by the
    first rank of each node only (every rank still exits with status 2)."""

    def _print_message(self, message, file=None):
        if os.environ.get("LOCAL_RANK", "0") == "0":
            super()._print_message(message, file)


class _Replaced(argparse.Action):
    """A flag that is gone: a usage error naming what replaced it."""

    def __init__(self, option_strings, dest, replacement, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was replaced by {self.replacement}")


def build_parser(prog="train/main.py"):
    parser = _Parser(
        prog=prog, description="Train SETR (mmseg's recipe) with FSDP2.", allow_abbrev=False,
        epilog="Defaults come from the preset: --head's ADE20K preset on a GPU, 'demo' without one. "
               "Every field has a --section.field flag too (e.g. --optim.momentum 0.8, "
               "--data.synthetic_size 96,128); see train/config.py.")
    parser.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}",
                        help="recipe (default: the --head's ADE20K preset on a GPU, 'demo' without one)")
    parser.add_argument("--work-dir", dest="work_dir", help="run directory: logs, checkpoints, config "
                        "(default work_dirs/setr_<head>_<backbone>_<preset>; demo: work_dirs/demo)")
    parser.add_argument("--seed", type=int, help="(default 0)")
    parser.add_argument("--deterministic", nargs="?", const=True, type=_parse_bool,
                        help="deterministic algorithms (bitwise-reproducible runs on CPU; default false)")
    parser.add_argument("--device", metavar="{auto,cpu,cuda}", help="(default auto: cuda when available)")
    types = dict(_fields(Config))
    for short, dotted in SHORT_FLAGS.items():
        t = types[dotted]
        kw = dict(dest=dotted, help=f"= --{dotted}" + _default_help(dotted), metavar=short.upper())
        if t is bool:
            kw.update(nargs="?", const=True, type=_parse_bool)
        else:
            kw.update(type=_converter(t))
        if dotted in CHOICES or dotted == "checkpoint.resume":
            kw.update(metavar="{" + ",".join(CHOICES.get(dotted, ("auto", "PATH"))) + "}")
        if dotted == "model.head":
            kw.update(help="decode head; without --preset it also picks that head's ADE20K preset on a GPU "
                           "(default pup)")
        parser.add_argument("--" + short.replace("_", "-"), **kw)
    for dotted, t in types.items():
        if "." not in dotted:
            continue
        kw = dict(dest=dotted, help=argparse.SUPPRESS, type=_converter(t))
        if t is bool:
            kw.update(nargs="?", const=True)
        parser.add_argument("--" + dotted, **kw)
    parser.add_argument("--activation-checkpointing", "--parallel.activation_checkpointing", nargs="?",
                        action=_Replaced, replacement="--recompute full (or none | selective)",
                        help=argparse.SUPPRESS)
    return parser


def _get(cfg, dotted):
    obj = cfg
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _set(cfg, dotted, value):
    *path, leaf = dotted.split(".")
    setattr(_get(cfg, ".".join(path)) if path else cfg, leaf, value)


def parse_config(argv=None, cuda_available=None, prog="train/main.py"):
    """Preset (chosen as documented above) + CLI overrides -> Config (choices checked, the rest
    not yet validated). A bad choice is a usage error (exit 2) naming the flag; prog: the command
    the usage and errors name."""
    parser = build_parser(prog)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if cuda_available is None:
        import torch  # after parsing: --help never waits for it

        cuda_available = torch.cuda.is_available()
    head = args.get("model.head", "pup")
    on_cpu = args.get("device") == "cpu" or not cuda_available
    # an unknown --head is reported by check_choices below
    name = args.get("preset") or ("demo" if on_cpu else head if head in HEADS else "pup")
    try:
        cfg = get_preset(name)
        for key, value in args.items():
            if key != "preset":
                _set(cfg, key, value)
        cfg.check_choices()
    except ConfigError as e:
        parser.error(str(e))
    d, m = cfg.data, cfg.model
    if d.dataset in NAMED_DATASETS:  # the dataset's classes and test resize rule unless given (the demo preset has 8)
        m.num_classes = args.get("model.num_classes", NAMED_DATASETS[d.dataset].num_classes)
        cfg.eval.short_min = args.get("eval.short_min", NAMED_DATASETS[d.dataset].test.short_min)
    if not args.get("preset") and on_cpu:
        cfg.notes.append(f"no GPU: using the small CPU 'demo' preset ({m.backbone}, {d.dataset} data, "
                         f"{d.crop_size[0]}x{d.crop_size[1]} crops, {cfg.parallel.precision}) with head "
                         f"{head!r}; pass --preset {head} for the full ADE20K recipe")
    elif not args.get("preset"):
        cfg.notes.append(f"preset {name!r} (mmseg's SETR-{head.upper()} ADE20K 512x512 recipe)")
    if cfg.preset == "demo" and d.dataset != "synthetic":
        cfg.notes.append(f"the 'demo' preset trains on {d.crop_size[0]}x{d.crop_size[1]} crops and evaluates "
                         f"at {min(cfg.eval.scale)} px (images rescaled into {cfg.eval.scale}), not at "
                         f"mmseg's 512: pass --preset {m.head} on a GPU for the ADE20K recipe")
    if "work_dir" not in args and cfg.preset != "demo":
        cfg.work_dir = f"work_dirs/setr_{m.head}_{m.backbone}_{cfg.preset}"
    return cfg


# ----------------------------------------------------------------------------------------------
# Resuming: what a resumed run may change
# ----------------------------------------------------------------------------------------------

# where and how fast it runs (the memory policy --recompute gives the same gradients), where the
# data lies (clusters stage it to a path of each job), how often it logs, evaluates and
# checkpoints, how long it trains (the poly schedule follows a new max_iters from the resumed
# iteration on) and what it does with bad samples (a run stopped by one resumes with
# --data.on_bad_sample skip); a section name covers all of its fields. Every other field defines
# what is trained and must stay (model.aux_num_convs too: the auxiliary heads' layers).
RESUME_MAY_CHANGE = ("preset", "work_dir", "device", "deterministic", "notes", "model.impl", "model.pretrained",
                     "data.root", "data.num_workers", "data.on_bad_sample", "data.max_bad_fraction",
                     "schedule.max_iters", "schedule.micro_batch_size", "parallel.recompute", "parallel.compile",
                     "checkpoint", "eval.interval", "eval.at_end", "eval.max_samples", "metrics", "profiler")


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _as_json(cfg):
    return json.loads(json.dumps(cfg.to_dict()))  # tuples as JSON lists


def config_differences(saved, cfg):
    """[(dotted field, value in saved, value in cfg)] for the fields that differ between a saved
    config (to_dict() as JSON) and cfg, RESUME_MAY_CHANGE left out. A field that the saved config
    lacks (written before the field existed) counts with its default, which keeps the behaviour it
    had before; a field that only the saved config has is gone and ignored."""
    theirs = {**dict(_flat(_as_json(Config()))), **dict(_flat(saved))}
    ours = dict(_flat(_as_json(cfg)))
    free = {name for name in ours if any(name == f or name.startswith(f + ".") for f in RESUME_MAY_CHANGE)}
    return [(name, theirs[name], value) for name, value in ours.items() if name not in free and theirs[name] != value]


if __name__ == "__main__":  # print the resolved config
    json.dump(parse_config(sys.argv[1:]).to_dict(), sys.stdout, indent=2)
