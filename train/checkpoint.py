"""Sharded, atomic, resumable checkpoints (torch.distributed.checkpoint), and the model export.

The run directory layout (and its read side) is in setr/run_dir.py. A checkpoint is written to
`iter_k.tmp/`; `meta.json` is written last, then rank 0 renames the directory to `iter_k/` (an
atomic rename) and replaces `latest` (temp file + os.replace). A crash or a failed write at any
point leaves the previous checkpoints intact, and a directory without `meta.json` is never
loaded. The work dir must be on a filesystem every rank sees (multi-node: shared storage).
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

from setr.files import first_line, write_atomic
from setr.run_dir import (LATEST, META, CheckpointError, DamagedCheckpoint, checkpoint_root,
                          complete_checkpoints, is_complete, iteration_dir, latest_checkpoint, read_meta)

FORMAT_VERSION = 1


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); the message names the path."""


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


def resolve_resume(resume, work_dir):
    """--resume value -> the checkpoint directories to try, in order ([] to start from scratch).

    'auto': the checkpoint `latest` names, then the other complete ones of work_dir, newest first
    (a damaged newest checkpoint falls back to an older one). A path: a checkpoint directory, or
    a run directory (its newest checkpoint), alone."""
    if not resume:
        return []
    if resume == "auto":
        pointer = os.path.join(checkpoint_root(work_dir), LATEST)
        named = []
        if os.path.isfile(pointer):
            with open(pointer) as f:
                named = [os.path.join(checkpoint_root(work_dir), f.read().strip())]
        older = [path for _, path in reversed(complete_checkpoints(work_dir))]
        return named + [path for path in older if path not in named]
    if not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume}: no such file or directory")
    if os.path.isdir(checkpoint_root(resume)):
        path = latest_checkpoint(resume)
        if path is None:
            raise CheckpointError(f"--resume {resume}: the run directory has no complete checkpoint")
        return [path]
    if not os.path.isdir(resume):
        raise CheckpointError(f"--resume {resume}: expected a checkpoint directory "
                              f"(work_dir/checkpoints/iter_*), got a file")
    if not is_complete(resume):
        raise CheckpointError(f"--resume {resume}: incomplete checkpoint ({META} missing: the run "
                              f"was probably stopped while writing it); use an older one")
    return [resume]


def _first_failure(e, rank):
    """(ranks, exception) of an error, unwrapping DCP's CheckpointException (one per failed rank)."""
    failures = getattr(e, "failures", None) or {rank: e}
    cause = next(iter(failures.values()))
    cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
    return sorted(failures), cause


def _describe(e):
    return f"{type(e).__name__}: {first_line(getattr(e, 'strerror', None) or e)}"


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
        """Write checkpoint `iteration` (meta: JSON-serializable trainer state). Returns (its path,
        seconds). A failed write (disk full, ...) raises CheckpointWriteError naming the path and
        leaves the earlier checkpoints and `latest` as they were."""
        final = iteration_dir(self.work_dir, iteration)
        tmp = final + ".tmp"
        start = time.perf_counter()
        try:
            self._write(tmp, model, optimizer, dict(meta, iteration=iteration))
            if self.rank == 0:
                self._publish(tmp, final, iteration)
        except (OSError, CheckpointException) as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            ranks, cause = _first_failure(e, self.rank)
            where = getattr(cause, "filename", None) or tmp
            raise CheckpointWriteError(f"cannot write checkpoint {where} (rank(s) {ranks}: {_describe(cause)}); "
                                       f"the earlier checkpoints are intact") from None
        _barrier()
        return final, time.perf_counter() - start

    def _write(self, tmp, model, optimizer, meta):
        """Every rank's shards and RNG state into `tmp`, then (rank 0) meta.json."""
        if self.rank == 0:
            os.makedirs(checkpoint_root(self.work_dir), exist_ok=True)
            for name in os.listdir(checkpoint_root(self.work_dir)):  # leftovers of crashed writes
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(checkpoint_root(self.work_dir), name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp)
        write_atomic(os.path.join(tmp, f"rng_rank{self.rank}.pt"), lambda f: torch.save(rng_state(), f))
        _barrier()  # every shard is on disk
        if self.rank == 0:
            meta = dict(meta, world_size=self.world_size, format=FORMAT_VERSION,
                        saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1))
            _fsync_dir(tmp)

    def _publish(self, tmp, final, iteration):
        """Rank 0: rename the complete `tmp` to `final`, point `latest` at it, prune old ones."""
        if os.path.exists(final):  # same iteration written before (e.g. a resumed run): replace it
            old = final + ".old.tmp"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)  # the earlier checkpoint of this iteration stays
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(checkpoint_root(self.work_dir))
        write_atomic(os.path.join(checkpoint_root(self.work_dir), LATEST), os.path.basename(final))
        # keep the newest keep_last up to this one; newer ones (an abandoned continuation) are left alone
        older = [path for it, path in complete_checkpoints(self.work_dir) if it <= iteration]
        for path in older[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

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
            ranks, cause = _first_failure(e, self.rank)  # CheckpointException is a BaseException
            raise DamagedCheckpoint(f"checkpoint {path} is corrupt or incomplete (rank(s) {ranks}: "
                                    f"{_describe(cause)})") from None
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        rng_path = os.path.join(path, f"rng_rank{self.rank}.pt")
        rng, problem = None, None
        if meta.get("world_size") == self.world_size and os.path.isfile(rng_path):
            try:
                rng = torch.load(rng_path, weights_only=True)
            except Exception as e:  # noqa: BLE001
                problem = f"checkpoint {path}: {os.path.basename(rng_path)} is unreadable ({type(e).__name__}: {e})"
        if self.world_size > 1:  # every rank falls back together, or none does
            problems = [None] * self.world_size
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
        if problem:
            raise DamagedCheckpoint(problem)
        if rng is not None:
            set_rng_state(rng)
        meta["rng_restored"] = rng is not None
        return meta
