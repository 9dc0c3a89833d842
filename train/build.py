"""A run's pieces before training: the data (training positions, evaluation split), the model
(seeded, pretrained weights, the same on every rank) and its plain evaluation copy."""
import copy
from types import SimpleNamespace

import torch
import torch.distributed as dist

import setr
from setr.data import NAMED_DATASETS, EvalSamples, TrainSamples, build_dataset
from train.config import ConfigError


def build_data(cfg):
    """Training samples (by global position) and the evaluation split, from the data config."""
    m, d = cfg.model, cfg.data
    kw = dict(root=d.root or None, num_classes=None if d.dataset in NAMED_DATASETS else m.num_classes,
              ignore_index=m.ignore_index, reduce_zero_label=d.reduce_zero_label,
              synthetic_size=tuple(d.synthetic_size), seed=cfg.seed)
    train_set = build_dataset(d.dataset, split="training", synthetic_samples=d.synthetic_train_samples, **kw)
    eval_set = build_dataset(d.dataset, split="validation", synthetic_samples=d.synthetic_val_samples, **kw)
    if train_set.num_classes != m.num_classes:
        raise ConfigError(f"the dataset has {train_set.num_classes} classes but --num-classes is {m.num_classes}")
    return SimpleNamespace(
        train=TrainSamples(train_set, tuple(d.crop_size), cfg.seed, scale=tuple(d.scale),
                           ratio_range=tuple(d.ratio_range), cat_max_ratio=d.cat_max_ratio,
                           skip_corrupt=d.on_bad_sample == "skip"),
        eval=EvalSamples(eval_set, scale=tuple(cfg.eval.scale), short_min=cfg.eval.short_min),
        class_names=list(eval_set.class_names),
        description=f"{d.dataset} ({len(train_set)} train / {len(eval_set)} val images)")


def build_model(cfg, device, log):
    """SETR built on the device, timm weights loaded (strict), and rank 0's tensors broadcast so
    that every rank shards the same model. Plain module: parallelize() comes next."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = setr.build_setr(m.head, m.backbone, m.num_classes, img_size=tuple(cfg.data.crop_size), impl=m.impl,
                            aux=m.aux, ignore_index=m.ignore_index, aux_num_convs=m.aux_num_convs, device=device)
    if m.pretrained:
        try:
            report = setr.load_timm_vit(model, m.pretrained)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--pretrained: {e}") from None
        log.info(f"pretrained backbone {m.pretrained}: all {len(model.backbone.state_dict())} keys loaded"
                 + "".join(f"; {n}" for n in report["notes"]))
    if dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t, src=0)
    return model


def eval_copy(model):
    """A plain copy of the (not yet parallelized) model for evaluation, refreshed before each one."""
    copy_ = copy.deepcopy(model).eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_
