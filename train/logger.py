"""Training logs: console lines (+ a progress bar on a terminal), work_dir/train.log,
work_dir/metrics.jsonl (one JSON object per log and eval event) and TensorBoard event files
when the tensorboard package is installed.

Ranks listed in the LOG_RANK environment variable (default "0") print to the console; only
rank 0 writes files.
"""
import json
import math
import os
import shutil
import sys
import time


def format_duration(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class Logger:
    def __init__(self, work_dir, rank, max_iters, progress_bar="auto", tensorboard=True):
        self.rank = rank
        self.max_iters = max_iters
        ranks = os.environ.get("LOG_RANK", "0")
        self.to_console = str(rank) in [r.strip() for r in ranks.split(",")] or ranks.strip() == "all"
        self.prefix = "" if ranks.strip() == "0" else f"[rank{rank}] "
        self.writes_files = rank == 0
        interactive = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        self.bar = self.to_console and (progress_bar == "on" or (progress_bar == "auto" and interactive))
        self._bar_text = ""
        self.jsonl = self.logfile = self.tb = None
        self.tb_note = None
        if self.writes_files:
            os.makedirs(work_dir, exist_ok=True)
            self.jsonl = open(os.path.join(work_dir, "metrics.jsonl"), "a", buffering=1)
            self.logfile = open(os.path.join(work_dir, "train.log"), "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(work_dir, "tensorboard"))
                except ImportError:
                    self.tb_note = "tensorboard is not installed: no event files (pip install tensorboard)"

    # -- console ---------------------------------------------------------------------------------
    def info(self, msg):
        stamp = time.strftime("%H:%M:%S")
        if self.to_console:
            if self.bar and self._bar_text:
                sys.stdout.write("\r\033[K")
            for line in str(msg).splitlines() or [""]:
                sys.stdout.write(f"{stamp} {self.prefix}{line}\n")
            if self.bar and self._bar_text:
                sys.stdout.write(self._bar_text)
            sys.stdout.flush()
        if self.logfile:
            for line in str(msg).splitlines() or [""]:
                self.logfile.write(f"{stamp} {line}\n")

    def warning(self, msg):
        self.info(f"WARNING: {msg}")

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
