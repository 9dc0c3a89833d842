"""Training logs: console lines (+ a progress bar on a terminal), work_dir/train.log,
work_dir/metrics.jsonl (one JSON object per log and eval event) and TensorBoard event files
when the tensorboard package is installed.

Ranks listed in the LOG_RANK environment variable (default "0") print to the console; only
rank 0 writes files.
"""
import json
import math
import os
import pickle
import resource
import shutil
import sys
import time

import torch
import torch.distributed as dist

from setr.data import DataError


def format_duration(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def max_memory_gib(device):
    """(max allocated, max reserved) GiB on a GPU since the last reset; (max RSS, None) on CPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2 ** 30,
                torch.cuda.max_memory_reserved(device) / 2 ** 30)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, None  # max RSS (kB on Linux)


def dump_memory_snapshot(work_dir, rank, iteration, oom=False):
    """Write the CUDA memory history to work_dir/memory_snapshot/ and stop recording; returns the path."""
    folder = os.path.join(work_dir, "memory_snapshot")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}_iter{iteration}{'_oom' if oom else ''}.pickle")
    with open(path, "wb") as f:
        pickle.dump(torch.cuda.memory._snapshot(), f, protocol=4)
    torch.cuda.memory._record_memory_history(enabled=None)
    return path


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class Logger:
    """Rank 0 opens its files (train.log, metrics.jsonl, tensorboard/) at the first event, i.e.
    once every check passed and the first iteration is done: a start refused or failed before
    that writes nothing into the work dir. before_files() runs just before (e.g. writes
    config.json); train.log then begins with the lines logged so far."""

    def __init__(self, work_dir, rank, max_iters, progress_bar="auto", tensorboard=True, before_files=None):
        self.rank = rank
        self.max_iters = max_iters
        ranks = os.environ.get("LOG_RANK", "0")
        self.to_console = str(rank) in [r.strip() for r in ranks.split(",")] or ranks.strip() == "all"
        self.prefix = "" if ranks.strip() == "0" else f"[rank{rank}] "
        self.files_pending = rank == 0  # rank 0 writes files, from the first event on
        interactive = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        self.bar = self.to_console and (progress_bar == "on" or (progress_bar == "auto" and interactive))
        self._bar_text = ""
        self.work_dir, self.tensorboard, self.before_files = work_dir, tensorboard, before_files
        self.jsonl = self.logfile = self.tb = None
        self.early_lines = []  # logged before the files were opened

    def _open_files(self):
        self.files_pending = False
        os.makedirs(self.work_dir, exist_ok=True)  # the run's first files create its work dir
        if self.before_files:
            self.before_files()
        self.jsonl = open(os.path.join(self.work_dir, "metrics.jsonl"), "a", buffering=1)
        self.logfile = open(os.path.join(self.work_dir, "train.log"), "a", buffering=1)
        self.logfile.writelines(self.early_lines)
        self.early_lines = None
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.work_dir, "tensorboard"))
            except ImportError:
                self.info("tensorboard is not installed: no event files (pip install tensorboard)")

    # -- console ---------------------------------------------------------------------------------
    def info(self, msg):
        stamp, lines = time.strftime("%H:%M:%S"), str(msg).splitlines() or [""]
        if self.to_console:
            if self.bar and self._bar_text:
                sys.stdout.write("\r\033[K")
            sys.stdout.writelines(f"{stamp} {self.prefix}{line}\n" for line in lines)
            if self.bar and self._bar_text:
                sys.stdout.write(self._bar_text)
            sys.stdout.flush()
        if self.logfile:
            self.logfile.writelines(f"{stamp} {line}\n" for line in lines)
        elif self.files_pending:
            self.early_lines += [f"{stamp} {line}\n" for line in lines]

    def warning(self, msg, every_rank=False):
        """every_rank: also printed (to stderr) by a rank that does not log to the console."""
        self.info(f"WARNING: {msg}")
        if every_rank and not self.to_console:
            print(f"{time.strftime('%H:%M:%S')} [rank{self.rank}] WARNING: {msg}", file=sys.stderr, flush=True)

    def progress(self, iteration, loss=None, eta=None):
        if not self.bar:
            return
        width = max(10, min(40, shutil.get_terminal_size((100, 20)).columns - 60))
        done = int(width * iteration / max(1, self.max_iters))
        text = f"[{'#' * done}{'.' * (width - done)}] {iteration}/{self.max_iters}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        if eta is not None:
            text += f" eta {format_duration(eta)}"
        self._bar_text = "\r\033[K" + text
        sys.stdout.write(self._bar_text)
        sys.stdout.flush()

    # -- events ----------------------------------------------------------------------------------
    def event(self, kind, iteration, values, tb_scalars=None):
        """Write one metrics.jsonl object {"event": kind, "iter": iteration, **values} and the
        TensorBoard scalars (hierarchical names -> values)."""
        if self.files_pending:
            self._open_files()
        if self.jsonl:
            record = {"event": kind, "iter": iteration, **values, "time": round(time.time(), 3)}
            self.jsonl.write(json.dumps(_json_safe(record)) + "\n")
        if self.tb and tb_scalars:
            for name, value in tb_scalars.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(name, value, iteration)

    def close(self):
        if self.bar and self._bar_text and self.to_console:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self._bar_text = ""
        for f in (self.jsonl, self.logfile):
            if f:
                f.close()
        if self.tb:
            self.tb.close()
        self.jsonl = self.logfile = self.tb = None


class MetricWindow:
    """Sums of the training metrics since the last log line: applied steps' loss terms and grad
    norms, every step's data wait and time."""

    def __init__(self):
        self.loss = self.grad_norm = self.data = self.time = 0.0
        self.terms = {}
        self.applied = self.iters = 0

    def add(self, out, data_seconds, step_seconds):
        """out: train_step's result; data_seconds / step_seconds: waiting for data / the whole step."""
        self.data += data_seconds
        self.time += step_seconds
        self.iters += 1
        if out["applied"]:
            self.applied += 1
            self.loss += out["loss"]
            self.grad_norm += out["grad_norm"]
            for k, v in out["terms"].items():
                self.terms[k] = self.terms.get(k, 0.0) + v

    def means(self, global_batch):
        """{loss, terms, grad_norm, img_per_s, data_wait} over the window (loss nan if no step applied)."""
        n = max(1, self.applied)
        return {"loss": self.loss / n if self.applied else float("nan"),
                "terms": {k: v / n for k, v in self.terms.items()}, "grad_norm": self.grad_norm / n,
                "img_per_s": global_batch * self.iters / max(self.time, 1e-9),
                "data_wait": self.data / max(self.time, 1e-9)}


class BadSamples:
    """Training samples replaced under --data.on_bad_sample skip: each file warned about once by
    the rank that read it, counted over all ranks, and the run stopped when more files are bad
    (as seen by one rank) than --data.max_bad_fraction of the split allows, which is always at
    least one: a small dataset may lose one file too."""

    def __init__(self, log, num_samples, max_fraction, device):
        self.log, self.num_samples, self.max_fraction, self.device = log, num_samples, max_fraction, device
        self.allowed = max(1, math.floor(max_fraction * num_samples))  # bad files tolerated
        self.files = {}  # path -> problem, this rank
        self.replaced = 0  # replacements by this rank
        self.restored = 0  # replacements (all ranks) before the checkpoint this run resumed from

    def note(self, path, problem):
        self.replaced += 1
        if path in self.files:
            return
        self.files[path] = problem
        self.log.warning(f"bad sample {path}: {problem} (replaced by the next dataset item)", every_rank=True)
        if len(self.files) > self.allowed:
            raise DataError(path, f"{len(self.files)} of the {self.num_samples} training samples are bad, more "
                                  f"than the {self.allowed} that --data.max_bad_fraction {self.max_fraction:g} allows: "
                                  f"fix or remove the files, or raise --data.max_bad_fraction")

    def count(self):
        """Replacements so far, all ranks: a collective, so every rank calls it at the same points."""
        count = torch.tensor([float(self.replaced)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
        return self.restored + int(count.item())
