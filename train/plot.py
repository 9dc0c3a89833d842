"""Training curves of one or more runs, overlaid, in one PNG (like mmseg's analyze_logs.py).

    python -m train.plot WORK_DIR [WORK_DIR ...] [--out FILE]

Reads each run's metrics.jsonl (the trainer's "train" and "eval" events) and draws, over
iterations: the loss and its terms, the learning rate (base and head), the gradient norm,
images/s, the data-wait share of the step, and the validation mIoU. Default output:
<first WORK_DIR>/curves.png. A resumed run logs some iterations twice: the later record wins.
Colour tells the runs apart, line style (and marker) the curves of one panel: the loss terms
total, decode, aux0, aux1, ... each have their own.
"""

import argparse
import json
import math
import os
import sys

from setr import cli
from setr.files import make_writable_dir, write_atomic

PANELS = (  # (title, y label, [(record key, legend suffix)], event)
    ("loss", "loss", None, "train"),  # None: "loss" and every "loss_<term>" key
    ("learning rate", "lr", [("lr", "base"), ("lr_head", "head")], "train"),
    ("gradient norm", "grad norm", [("grad_norm", "")], "train"),
    ("throughput", "images/s", [("img_per_s", "")], "train"),
    ("data wait", "share of the step", [("data_wait", "")], "train"),
    ("validation", "mIoU (%)", [("mIoU", "")], "eval"),
)
# (line style, marker) of the i-th curve of a panel; the total loss is drawn thicker
STYLES = (("-", ""), ("--", ""), (":", ""), ("-.", ""), ("-", "^"), ("--", "s"), (":", "D"), ("-.", "v"))


class PlotError(Exception):
    """A run folder without readable metrics, or an output that cannot be written."""


def read_metrics(work_dir):
    """{event kind: {iteration: record}} from work_dir/metrics.jsonl; unreadable lines (a write cut
    short by a crash) are reported on stderr and skipped."""
    path = os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{work_dir}: no metrics.jsonl (not a training run folder?)")
    events = {}
    try:
        with open(path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    events.setdefault(record["event"], {})[int(record["iter"])] = record
                except (ValueError, KeyError, TypeError) as e:
                    print(f"warning: {path}:{n}: skipped unreadable record ({type(e).__name__})", file=sys.stderr)
    except OSError as e:
        raise PlotError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not events.get("train") and not events.get("eval"):
        raise PlotError(f"{path}: no train or eval records")
    return events


def _series(records, key):
    """(iterations, values) of `key` over records sorted by iteration, finite numbers only."""
    xs, ys = [], []
    for it in sorted(records):
        v = records[it].get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(it)
            ys.append(v)
    return xs, ys


def _panel_keys(keys, records):
    """[(record key, legend suffix)] of a panel; the loss panel: total, decode, then the aux terms."""
    if keys is not None:
        return keys
    terms = sorted({k for r in records.values() for k in r if k.startswith("loss_")},
                   key=lambda k: (k != "loss_decode", k))
    return [("loss", "total")] + [(k, k[len("loss_"):]) for k in terms]


def draw(runs):
    """runs: [(label, events)] -> the matplotlib figure of every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, keys, kind) in zip(axes.flat, PANELS):
        for r, (label, events) in enumerate(runs):
            records = events.get(kind, {})
            for i, (key, suffix) in enumerate(_panel_keys(keys, records)):
                xs, ys = _series(records, key)
                if not xs:
                    continue
                style, marker = STYLES[i % len(STYLES)]
                ax.plot(xs, ys, style, color=colours[r % len(colours)], marker="o" if kind == "eval" else marker,
                        markevery=None if kind == "eval" else max(1, len(xs) // 12), markersize=3,
                        linewidth=2.0 if key == "loss" else 1.2, label=f"{label} {suffix}".strip())
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return fig


def plot_runs(runs, out):
    """runs: [(label, events)]; writes one PNG at `out` (atomically) and returns it."""
    import matplotlib.pyplot as plt

    fig = draw(runs)
    try:
        write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    p.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="training run folders (metrics.jsonl inside)")
    p.add_argument("--out", default=None, help="PNG to write (default <first WORK_DIR>/curves.png)")
    args = p.parse_args(argv)
    return cli.run("train.plot", lambda: plot(args.work_dirs, args.out), PlotError)


def plot(work_dirs, out=None):
    """Read the runs, write the PNG (default <first run>/curves.png); returns the exit code."""
    out = out or os.path.join(work_dirs[0], "curves.png")
    names = [os.path.basename(os.path.normpath(d)) for d in work_dirs]
    if len(set(names)) < len(names):  # runs/a/run and runs/b/run: tell them apart by path
        names = list(work_dirs)
    runs = [(name, read_metrics(d)) for name, d in zip(names, work_dirs)]
    if os.path.isdir(out):
        raise PlotError(f"--out {out} is a folder; expected the path of a .png file")
    try:
        make_writable_dir(os.path.dirname(os.path.abspath(out)))
        print(plot_runs(runs, out))
    except OSError as e:
        raise PlotError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
