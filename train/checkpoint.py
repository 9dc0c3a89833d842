"""Sharded, atomic, resumable checkpoints (torch.distributed.checkpoint), and the model export.

Layout of a run directory:

    work_dir/checkpoints/iter_00016000/      one complete checkpoint
        .metadata, __0_0.distcp, ...         model + optimizer, sharded (DCP): each rank writes its shards
        rng_rank{r}.pt                       torch / cuda / numpy / python RNG states of rank r
        meta.json                            iteration, scheduler, data position, model identity, ...
    work_dir/checkpoints/latest              name of the checkpoint written last
    work_dir/model_final.pth                 consolidated single-file model (setr.export_model)

A checkpoint is written to `iter_k.tmp/`; `meta.json` is written last, then rank 0 renames the
directory to `iter_k/` (an atomic rename) and replaces `latest` (temp file + os.replace). A crash
at any point leaves the previous checkpoints intact, and a directory without `meta.json` is
never loaded. The work dir must be on a filesystem every rank sees (multi-node: shared storage).
"""
import json
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

META = "meta.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


def checkpoint_root(work_dir):
    return os.path.join(work_dir, "checkpoints")


def iteration_dir(work_dir, iteration):
    return os.path.join(checkpoint_root(work_dir), f"iter_{iteration:08d}")


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def resolve_resume(resume, work_dir):
    """--resume value -> checkpoint directory, or None to start from scratch.

    'auto': the newest complete checkpoint of work_dir (None if there is none). A path: a
    checkpoint directory, or a run directory (its newest checkpoint)."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(work_dir)
    if not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume}: no such file or directory")
    if os.path.isdir(checkpoint_root(resume)):
        path = latest_checkpoint(resume)
        if path is None:
            raise CheckpointError(f"--resume {resume}: the run directory has no complete checkpoint")
        return path
    if not os.path.isdir(resume):
        raise CheckpointError(f"--resume {resume}: expected a checkpoint directory "
                              f"(work_dir/checkpoints/iter_*), got a file")
    if not is_complete(resume):
        raise CheckpointError(f"--resume {resume}: incomplete checkpoint ({META} missing: the run "
                              f"was probably stopped while writing it); use an older one")
    return resume


def read_meta(path):
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {META} missing (incomplete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {META} is unreadable ({e})") from None
    if not isinstance(meta, dict) or "iteration" not in meta or "model" not in meta:
        raise CheckpointError(f"checkpoint {path}: {META} is not a checkpoint description of this engine")
    return meta


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(model, optimizer):
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


class Checkpointer:
    """Saves and loads the training state of one run. All ranks call save / load together."""

    def __init__(self, work_dir, keep_last=3):
        self.work_dir = work_dir
        self.keep_last = max(1, int(keep_last))
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def save(self, iteration, model, optimizer, meta):
        """Write checkpoint `iteration` (meta: JSON-serializable trainer state). Returns its path."""
        final = iteration_dir(self.work_dir, iteration)
        tmp = final + ".tmp"
        start = time.perf_counter()
        if self.rank == 0:
            os.makedirs(checkpoint_root(self.work_dir), exist_ok=True)
            for name in os.listdir(checkpoint_root(self.work_dir)):  # leftovers of crashed writes
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(checkpoint_root(self.work_dir), name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp)
        rng_path = os.path.join(tmp, f"rng_rank{self.rank}.pt")
        torch.save(rng_state(), rng_path)
        with open(rng_path, "rb") as f:
            os.fsync(f.fileno())
        _barrier()  # every shard is on disk
        if self.rank == 0:
            meta = dict(meta, iteration=iteration, world_size=self.world_size, format=FORMAT_VERSION,
                        saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            _write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            if os.path.exists(final):  # same iteration written before (e.g. a re-run): replace it
                old = final + ".old.tmp"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(checkpoint_root(self.work_dir))
            _write_atomic(os.path.join(checkpoint_root(self.work_dir), LATEST), os.path.basename(final))
            # keep the newest keep_last up to this one; newer ones (an abandoned continuation) are left alone
            older = [path for it, path in complete_checkpoints(self.work_dir) if it <= iteration]
            for path in older[:-self.keep_last]:
                shutil.rmtree(path, ignore_errors=True)
        _barrier()
        return final, time.perf_counter() - start

    def load(self, path, model, optimizer, identity):
        """Load model + optimizer + this rank's RNG states from checkpoint `path`; returns its meta.

        identity: {head, backbone, num_classes, global_batch, seed, ...} of this run; a checkpoint
        of another model or data stream is refused before anything is loaded."""
        meta = read_meta(path)
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this code reads "
                                  f"format {FORMAT_VERSION}")
        theirs = meta["model"]
        diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} was written by another model or data stream ({what})")
        state = _sharded_state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged checkpoint
            # DCP's CheckpointException (a BaseException) wraps each failing rank's exception
            failures = getattr(e, "failures", None) or {self.rank: e}
            cause = next(iter(failures.values()))
            cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise CheckpointError(f"checkpoint {path} is corrupt or incomplete (rank(s) "
                                  f"{sorted(failures)}: {type(cause).__name__} {detail})") from None
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        rng_path = os.path.join(path, f"rng_rank{self.rank}.pt")
        if meta.get("world_size") == self.world_size and os.path.isfile(rng_path):
            try:
                set_rng_state(torch.load(rng_path, weights_only=True))
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"checkpoint {path}: {os.path.basename(rng_path)} is unreadable "
                                      f"({type(e).__name__}: {e})") from e
            meta["rng_restored"] = True
        else:
            meta["rng_restored"] = False
        return meta
