"""Evaluate a SETR checkpoint on a segmentation split: mIoU, mAcc, aAcc, per-class IoU / Acc, speed.

    python -m setr.evaluate --checkpoint CKPT --dataset ade20k --data-root ADEChallengeData2016
        (or --dataset cityscapes|pascal_context|pascal_context59|folder: setr.data.catalog)
        [--split validation] [--mode slide|whole] [--aug] [--crop-size 512] [--stride 341]
        [--out DIR] [--save-predictions]
    python -m setr.evaluate --checkpoint work_dirs/demo     # a training run, on the data it used
    torchrun --nproc_per_node=8 -m setr.evaluate ...      # images split across ranks

CKPT: our export, an mmseg SETR checkpoint, or a training run (see setr.predict.build_model). Given
a training run (its directory, model_final.pth or a checkpoint in it), --dataset, --data-root and
the synthetic data's size, count and seed default to the run's own (its config.json), so the demo
run evaluates on the validation split it was evaluated on while training.
The metrics are computed by setr.inference.evaluate, the evaluation the training loop runs, on
mmseg's test pipeline (keep-ratio rescale into the test scale, slide or whole inference, logits
resized to the original size). Under torchrun each rank evaluates every world_size-th image and the
per-class counts are summed, so any number of ranks gives the same numbers. On a GPU the model
runs under bf16 autocast (--precision fp32 turns it off). Writes <out>/metrics.json and, with
--save-predictions, <out>/<image name>_label.png as setr.predict writes them.

Exit status: 0 done, 2 bad arguments, checkpoint or dataset (also a bad file met during the
evaluation), 1 a failure while running. Under torchrun every rank exits so, and a mistake that
every rank meets before the evaluation is said once, by rank 0. --out is created when the first
file is written: a refused start leaves no folder behind.
"""

import argparse
import datetime
import json
import math
import os
import sys

# torch-free imports only: the arguments are parsed, and --help answered, before torch loads; the
# functions below import the rest where they need it.
from setr import cli
from setr.data.catalog import IGNORE_INDEX, NAMED_DATASETS
from setr.data.datasets import DATASETS, DataError, LabelValueError, build_dataset
from setr.files import write_atomic
from setr.predict import (PredictError, add_model_args, build_model, check_output_dir, pipeline_settings,
                          resolve_device, save_label)
from setr.run_dir import CheckpointError, run_config

METRICS = "metrics.json"  # in --out
MISTAKES = (PredictError, CheckpointError, DataError)  # the user's: one line, exit 2 (setr.cli)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m setr.evaluate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: the training run's when --checkpoint is one, else ade20k. ade20k: the "
                        "ADEChallengeData2016 folder; cityscapes: the folder holding leftImg8bit/ and gtFine/; "
                        "pascal_context (60 classes) / pascal_context59: VOCdevkit/VOC2010; folder: "
                        "images/<split> + annotations/<split>; synthetic: the built-in data. A named dataset "
                        "sets the test defaults (setr.data.catalog)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the training run's; synthetic needs none)")
    p.add_argument("--split", default="validation", help="split folder name (default validation)")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="folder datasets: label value ignored (default: the checkpoint's, else 255)")
    p.add_argument("--reduce-zero-label", action="store_true",
                   help="folder datasets: raw label 0 is ignored, k becomes k - 1 (ADE20K does this always)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers prefetching images (default 2)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype on a GPU (default bf16; the CPU always runs fp32)")
    p.add_argument("--out", default=None, help="output folder (default: eval_<checkpoint name>)")
    p.add_argument("--save-predictions", action="store_true", help="write <out>/<image name>_label.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out>/metrics.json")
    return p.parse_args(argv)


def _distributed():
    """(rank, world_size, device) under torchrun (process group initialized), else (0, 1, None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    device = None
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world_size, device


def dataset_settings(args, run):
    """(name, build_dataset keyword arguments) of the split to evaluate: the flags, else the training
    run's data (run: its config.json as a dict, or None), else ADE20K."""
    data = (run or {}).get("data", {})
    name = args.dataset or data.get("dataset") or "ade20k"
    from_run = name == data.get("dataset")
    root = args.data_root or (data.get("root") if from_run else None) or None
    if name == "synthetic" and args.data_root:
        raise PredictError(f"--data-root {args.data_root} is not used by --dataset synthetic (the built-in data)")
    if name != "synthetic" and not root:
        raise PredictError(f"--dataset {name} needs --data-root (the dataset folder)"
                           + ("; --dataset synthetic evaluates on the built-in data" if run is None else ""))
    kwargs = dict(root=root, split=args.split,
                  reduce_zero_label=args.reduce_zero_label or (from_run and data.get("reduce_zero_label")) or None)
    if name == "synthetic" and from_run:  # the run's own scenes: size, count and seed
        training = args.split in ("train", "training")
        kwargs.update(synthetic_size=tuple(data["synthetic_size"]), seed=run["seed"],
                      synthetic_samples=data["synthetic_train_samples" if training else "synthetic_val_samples"])
    return name, kwargs


def _dataset(args, info, ignore_index, name, kwargs):
    """The raw split to evaluate (name, kwargs: dataset_settings), checked against the model."""
    named = NAMED_DATASETS.get(name)
    if named and ignore_index != IGNORE_INDEX:  # the class count: build_model checked it
        raise PredictError(f"{named.title} has {named.num_classes} classes and ignore_index {IGNORE_INDEX}; the "
                           f"checkpoint has {info['num_classes']} classes, ignore_index {ignore_index}")
    try:
        dataset = build_dataset(name, num_classes=info["num_classes"], ignore_index=ignore_index,
                                class_names=info["class_names"] if name == "folder" else None, **kwargs)
    except (DataError, ValueError) as e:
        where = f"--data-root {kwargs['root']} " if kwargs["root"] else ""
        raise PredictError(f"--dataset {name} {where}--split {args.split}: {e}") from None
    return dataset


def _nan_to_none(value):
    """JSON has no NaN: undefined metrics (a class absent from labels and predictions) become null."""
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_metrics(path, result, settings):
    """metrics.json (atomic): mIoU, mAcc, aAcc, per-class IoU / Acc lists (null where undefined),
    class names, images/s, seconds, and the settings that produced them."""
    record = {k: _nan_to_none(result[k]) for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "num_images",
                                                    "seconds", "images_per_s")}
    record = {**record, "class_names": [p["name"] for p in result["per_class"]], **settings}
    write_atomic(path, json.dumps(record, indent=1))


def check_flags(args):
    """Refuse flag values that cannot work, before anything loads."""
    if args.max_samples is not None and args.max_samples < 1:
        raise PredictError(f"--max-samples must be >= 1 (leave it out for the whole split), got {args.max_samples}")
    if args.num_workers < 0:
        raise PredictError(f"--num-workers must be >= 0 (0: read the images in this process), got {args.num_workers}")


def _prepare(args, device):
    """Everything before the first image, where a user's mistake shows: flags, checkpoint, dataset, --out.
    Returns (model, info, the raw split, ignore_index, the settings for metrics.json, --out)."""
    check_flags(args)
    out = args.out or f"eval_{os.path.splitext(os.path.basename(os.path.normpath(args.checkpoint)))[0]}"
    metrics_path = os.path.join(out, METRICS)
    if os.path.exists(metrics_path) and not args.overwrite:  # before any loading
        raise PredictError(f"{metrics_path} exists (another evaluation's); pass --overwrite or another --out")
    run = run_config(args.checkpoint)
    dataset_name, data_kwargs = dataset_settings(args, run)
    check_output_dir(out)  # created when the first file is written: a refused start leaves no folder
    device = device or resolve_device(args.device)
    model, info = build_model(args.checkpoint, args.head, args.backbone, args.num_classes, device, args.impl,
                              dataset_name)
    ignore_index = args.ignore_index if args.ignore_index is not None else model.ignore_index
    mode, scale, crop, stride = pipeline_settings(args, info)
    dataset = _dataset(args, info, ignore_index, dataset_name, data_kwargs)
    bf16 = device.startswith("cuda") and args.precision == "bf16"
    settings = dict(checkpoint=args.checkpoint, dataset=dataset_name, data_root=data_kwargs["root"],
                    split=args.split, mode=mode, aug=args.aug, scale=list(scale), crop_size=crop,
                    stride=stride, impl=args.impl, precision="bf16" if bf16 else "fp32")
    return model, info, dataset, ignore_index, settings, out


def _setup_failed(failed, rank, world_size):
    """Under torchrun, once every rank has set up (a collective: each rank calls it once): (whether any
    rank failed, whether this rank says why). The ranks meet the same mistakes alike, so rank 0 says it
    alone; a mistake that rank 0 did not meet (a file missing on one node) is said by the ranks that did."""
    if world_size == 1:
        return failed, failed
    import torch.distributed as dist

    outcomes = [None] * world_size
    dist.all_gather_object(outcomes, failed)
    return any(outcomes), failed and (rank == 0 or not outcomes[0])


def _run(args, job, rank, world_size):
    """Evaluate, report; returns the result dict (rank 0 writes metrics.json)."""
    import torch
    import torch.distributed as dist

    from setr.data import EvalSamples
    from setr.inference import evaluate

    model, info, dataset, ignore_index, settings, out = job
    scale, crop, stride = settings["scale"], settings["crop_size"], settings["stride"]
    samples = EvalSamples(dataset, scale=scale, short_min=info["short_min"])
    save = None
    if args.save_predictions:
        def save(name, pred):
            os.makedirs(out, exist_ok=True)
            save_label(pred.numpy(), info["palette"], os.path.join(out, f"{name}_label.png"))
    autocast = torch.bfloat16 if settings["precision"] == "bf16" else None
    try:
        result = evaluate(model, samples, info["num_classes"], ignore_index, mode=settings["mode"],
                          crop_size=(crop, crop), stride=(stride, stride),
                          class_names=info["class_names"] or samples.class_names, rank=rank, world_size=world_size,
                          max_samples=args.max_samples, aug=args.aug, num_workers=args.num_workers,
                          autocast_dtype=autocast, on_prediction=save)
    except LabelValueError as e:
        raise PredictError(f"{e}: the checkpoint {args.checkpoint} predicts {info['num_classes']} classes "
                           f"(ignore_index {ignore_index}); evaluate it on the data it was trained on") from None
    if world_size > 1:  # the evaluation took as long as its slowest rank
        seconds = torch.tensor([result["seconds"]], dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        result["seconds"] = float(seconds)
    result["images_per_s"] = result["num_images"] / max(result["seconds"], 1e-9)
    if rank == 0:
        metrics_path = os.path.join(out, METRICS)
        os.makedirs(out, exist_ok=True)
        write_metrics(metrics_path, result, dict(settings, world_size=world_size))
        print(result["table"])
        print(f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}  "
              f"{result['num_images']} images in {result['seconds']:.1f} s ({result['images_per_s']:.2f} images/s, "
              f"{world_size} process(es))  -> {metrics_path}")
    return result


def main(argv=None):
    args = parse_args(argv)
    return cli.run("setr.evaluate", lambda: _evaluate(args), MISTAKES)


def _evaluate(args):
    """One process of the evaluation (of several under torchrun); returns the exit code."""
    rank, world_size, device = _distributed()
    try:
        try:
            job, problem = _prepare(args, device), None
        except MISTAKES as e:
            job, problem = None, e
        any_failed, say = _setup_failed(problem is not None, rank, world_size)
        if say:
            raise problem
        if any_failed:
            return cli.BAD_INPUT  # another rank said why
        _run(args, job, rank, world_size)
        return 0
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
