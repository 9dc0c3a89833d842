"""A training run directory, read side: which checkpoints it holds, and a model out of them.

    work_dir/checkpoints/iter_00016000/      one complete checkpoint
        .metadata, __0_0.distcp, ...         model + optimizer, sharded (torch.distributed.checkpoint)
        rng_rank{r}.pt                       RNG states of rank r
        meta.json                            iteration, model identity, export meta, ... (written last)
    work_dir/checkpoints/latest              name of the checkpoint written last
    work_dir/model_final.pth                 consolidated single-file model (setr.export_model)
    work_dir/config.json                     the run's resolved training config (train/config.py)

Training (train/checkpoint.py) writes this layout; prediction and evaluation read it here. Only
read_sharded_model needs torch (imported there): the rest serves command lines before torch loads.
"""
import json
import os
import warnings

from setr.files import first_line

META = "meta.json"
LATEST = "latest"
FINAL = "model_final.pth"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"  # the run's checkpoint folder


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or unreadable."""


def checkpoint_root(work_dir):
    return os.path.join(work_dir, CHECKPOINTS)


def iteration_dir(work_dir, iteration):
    return os.path.join(checkpoint_root(work_dir), f"iter_{iteration:08d}")


def is_complete(path):
    return os.path.isfile(os.path.join(path, META))


def complete_checkpoints(work_dir):
    """[(iteration, path)] of the complete checkpoints of a run, oldest first."""
    root = checkpoint_root(work_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("iter_") and name[5:].isdigit() and is_complete(path):
            found.append((int(name[5:]), path))
    return sorted(found)


def latest_checkpoint(work_dir):
    """Path of the checkpoint the run wrote last (None if there is none).

    The `latest` pointer decides when it names a complete checkpoint: after a resume from an older
    checkpoint, the newer ones of the abandoned continuation stay on disk but are not picked. Without
    a usable pointer, the highest complete iteration."""
    pointer = os.path.join(checkpoint_root(work_dir), LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(checkpoint_root(work_dir), f.read().strip())
        if is_complete(path):
            return path
    candidates = complete_checkpoints(work_dir)
    return candidates[-1][1] if candidates else None


def read_meta(path):
    """meta.json of checkpoint directory `path`; CheckpointError when missing or unreadable."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"checkpoint {path}: {META} missing (incomplete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {path}: {META} is unreadable ({e})") from None
    if not isinstance(meta, dict) or "iteration" not in meta or "model" not in meta:
        raise CheckpointError(f"checkpoint {path}: {META} is not a checkpoint description of this engine")
    return meta


def model_source(path):
    """What `path` names -> a model file or a checkpoint directory to read the weights from.

    A file (our export, an mmseg checkpoint) is itself; a run directory gives its model_final.pth,
    unless a later checkpoint exists (a resumed, longer run), else its latest checkpoint;
    `checkpoints/latest` the checkpoint it points to."""
    path = os.path.normpath(os.fspath(path))
    if os.path.isfile(path) and os.path.basename(path) == LATEST:
        path = os.path.dirname(os.path.abspath(path))  # the checkpoints folder: its latest one
        run = os.path.dirname(path)
        found = latest_checkpoint(run)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint in {checkpoint_root(run)}")
        return found
    if os.path.isfile(path) or not os.path.isdir(path):
        return path  # a file (or nothing: the loader names it)
    final = os.path.join(path, FINAL)
    if os.path.isfile(final):
        newest = latest_checkpoint(path) if os.path.isdir(checkpoint_root(path)) else None
        newer = newest is not None and os.path.getmtime(os.path.join(newest, META)) > os.path.getmtime(final)
        return newest if newer else final
    if os.path.isdir(checkpoint_root(path)) or os.path.basename(path) == "checkpoints":
        run = path if os.path.isdir(checkpoint_root(path)) else os.path.dirname(path)
        found = latest_checkpoint(run)
        if found is None:
            raise CheckpointError(f"{path}: a run directory without {FINAL} or a complete checkpoint")
        return found
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint directory ({META} missing); give "
                              f"a model file (e.g. the run's {FINAL}) or a checkpoints/iter_* directory")
    return path


def run_config(path):
    """The training config (dict) of the run that `path` belongs to, or None: `path` names a run
    directory, its model_final.pth, checkpoints/, a checkpoints/iter_* directory or checkpoints/latest
    of a run whose config.json exists. CheckpointError when that config.json is unreadable."""
    path = os.path.abspath(os.fspath(path))
    name = os.path.basename(path)
    if is_complete(path) or name == LATEST:  # checkpoints/iter_* or checkpoints/latest
        run = os.path.dirname(os.path.dirname(path))
    elif name in (FINAL, CHECKPOINTS):  # model_final.pth or checkpoints/
        run = os.path.dirname(path)
    elif os.path.isdir(path):
        run = path
    else:
        return None  # any other file: a model without a run
    config = os.path.join(run, CONFIG)
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"run {run}: {CONFIG} is unreadable ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict):
        raise CheckpointError(f"run {run}: {CONFIG} is not a training config of this engine")
    return cfg


def read_sharded_model(path):
    """{"meta": export meta, "state_dict": full tensors} of checkpoint directory `path`: the model
    part of the sharded checkpoint consolidated in this process (no process group needed)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_meta(path)
    if not isinstance(meta.get("export"), dict):
        raise CheckpointError(f"checkpoint {path}: {META} has no model description ('export'); "
                              f"use the run's {FINAL}")
    try:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in stored.items()
                 if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except Exception as e:  # noqa: BLE001 - any damage: name the checkpoint
        raise DamagedCheckpoint(f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    return {"meta": dict(meta["export"], iteration=meta["iteration"]),
            "state_dict": {k[len("model."):]: v for k, v in state.items()}}
