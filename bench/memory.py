"""Memory profile of a SETR training step: peak by phase, bytes by part, per-image memory vs batch.

    python bench/memory.py --head pup                       # ViT-L/16, 512x512, batch 8, one GPU
    python bench/memory.py --head pup --snapshot            # + a memory_viz snapshot per variant
    python bench/memory.py --head all --batches 1 2 4 8 16  # per-image memory vs batch size
    python bench/memory.py --quick                          # tiny config (CPU smoke test)
    python bench/memory.py --estimate --head pup --batch 16 # planned, no GPU needed (see bench/memory_estimate.py)

After one warm-up step (so that the SGD momentum buffers exist), one step is measured phase by
phase with torch.cuda.memory_allocated / max_memory_allocated:
  peak_forward / peak_backward / peak_optimizer: the peak allocated during each phase (absolute);
  weights: parameters + buffers; grads: the .grad tensors after backward; optimizer_state: the
  momentum buffers; inputs: images + labels; activations: the forward peak minus all of those
  (under bf16 autocast this includes autocast's bf16 weight copies); saved_activations: what the
  forward still holds for the backward when it returns.
--snapshot records the measured step with torch.cuda.memory._record_memory_history and writes
memory_<head>_<variant>_b<B>.pickle: open it at https://pytorch.org/memory_viz.
The batch sweep runs two steps per batch size and reports the second step's peak, peak / batch
and the marginal memory of one more image. Precision and optimizer as bench/train_step.py.

Without a GPU this runs the same code on the tiny config (vit_tiny, 32x32) as a smoke test: device memory is n/a
(weights, grads and optimizer state are still exact byte counts of the tensors) and no snapshot
is written.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as `python bench/memory.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench import common
from bench.train_step import (
    GIB, GOAL_BATCH, GOAL_GPU_GIB, GOAL_MEM_PER_IMAGE_GIB, HEADS, append_section, autocast, build_model,
    add_model_args, error_text, free_memory, gpu_memory_gib, is_oom, make_batch, make_optimizer, ours_note,
    resolve_model_args, set_memory_limit, sync, train_step,
)

VARIANTS = ("eager", "sdpa", "triton")
OURS = "triton"
MEMVIZ = "https://pytorch.org/memory_viz"

TINY = dict(backbone="vit_tiny", img_size=32, batch=2, batches=[1, 2])
FULL = dict(backbone="vit_large", img_size=512, batch=8, batches=[1, 2, 4, 8, 16])


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_state_bytes(optimizer):
    return tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def _gib(nbytes):
    return None if nbytes is None else nbytes / GIB


class Probe:
    """Allocated / peak-allocated device memory around a phase (None everywhere on CPU)."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def allocated(self):
        if not self.cuda:
            return None
        sync(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self):
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        if not self.cuda:
            return None
        sync(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def measure_phases(model, optimizer, images, labels, cfg, device, snapshot_path=None):
    """One measured step after a warm-up step; returns the phase peaks and parts in bytes."""
    train_step(model, optimizer, images, labels, device, cfg["dtype"])  # warm-up: creates the SGD state
    free_memory()
    probe = Probe(device)
    if snapshot_path:
        torch.cuda.memory._record_memory_history(max_entries=100000, stacks="python")
    try:
        static = probe.allocated()  # weights + optimizer state + inputs
        probe.reset_peak()
        with autocast(device, cfg["dtype"]):
            losses = model(images, labels)
            loss = sum(losses.values())
        after_forward, peak_forward = probe.allocated(), probe.peak()
        probe.reset_peak()
        loss.backward()
        peak_backward = probe.peak()
        grads = tensor_bytes(p.grad for p in model.parameters())
        del loss, losses
        probe.reset_peak()
        optimizer.step()
        peak_optimizer = probe.peak()
        optimizer.zero_grad(set_to_none=True)
        if snapshot_path:
            torch.cuda.memory._dump_snapshot(snapshot_path)
    except Exception as e:
        if snapshot_path and is_oom(e):  # the snapshot of an out-of-memory step shows what filled it
            torch.cuda.memory._dump_snapshot(snapshot_path.replace(".pickle", "_oom.pickle"))
        raise
    finally:
        if snapshot_path:
            torch.cuda.memory._record_memory_history(enabled=None)
    weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    out = dict(weights=weights, grads=grads, optimizer_state=optimizer_state_bytes(optimizer),
               inputs=tensor_bytes([images, labels]), peak_forward=peak_forward,
               peak_backward=peak_backward, peak_optimizer=peak_optimizer)
    if static is not None:
        out["activations"] = peak_forward - static
        out["saved_activations"] = after_forward - static
        out["peak"] = max(peak_forward, peak_backward, peak_optimizer)
    return out


def _sweep_point(model, optimizer, cfg, batch, device):
    """Peak bytes of the second of two steps at this batch (None on CPU); "OOM" when it does not fit."""
    probe = Probe(device)
    try:
        images, labels = make_batch(batch, cfg["img_size"], cfg["num_classes"], device)
        train_step(model, optimizer, images, labels, device, cfg["dtype"])
        probe.reset_peak()
        train_step(model, optimizer, images, labels, device, cfg["dtype"])
        return probe.peak()
    except Exception as e:  # noqa: BLE001 - only out-of-memory is swallowed
        if is_oom(e):
            return "OOM"
        raise


def run_variant(head, variant, cfg, device, outdir):
    """The phase row and the batch-sweep rows of one variant."""
    h = w = cfg["img_size"]
    base = dict(kernel=f"setr_{head}_{cfg['backbone']}", head=head, backbone=cfg["backbone"],
                provider=variant, img_size=cfg["img_size"],
                dtype="bf16 autocast, fp32 params" if cfg["dtype"] == "bf16" else "fp32")
    phase = dict(base, mode="phases", shape=f"{cfg['batch']}x3x{h}x{w}", batch=cfg["batch"])
    sweep = [dict(base, mode="batch_sweep", shape=f"{b}x3x{h}x{w}", batch=b) for b in cfg["batches"]]
    model = optimizer = None
    try:
        torch.manual_seed(0)
        model = build_model(head, cfg["backbone"], variant, cfg["img_size"], cfg["num_classes"], device)
        optimizer = make_optimizer(model, head)
        snapshot = None
        if cfg["snapshot"] and device.type == "cuda":
            snapshot = os.path.join(outdir, f"memory_{head}_{variant}_b{cfg['batch']}.pickle")
        images, labels = make_batch(cfg["batch"], cfg["img_size"], cfg["num_classes"], device)
        try:
            parts = measure_phases(model, optimizer, images, labels, cfg, device, snapshot)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            parts = None
            phase["error"] = f"OOM at batch {cfg['batch']}"
        del images, labels
        optimizer.zero_grad(set_to_none=True)
        free_memory()
        if parts is not None:
            phase.update({f"{k}_gib": _gib(v) for k, v in parts.items()})
            if parts.get("peak") is not None:
                phase["per_image_gib"] = parts["peak"] / GIB / cfg["batch"]
            if snapshot:
                phase["snapshot"] = os.path.basename(snapshot)
                print(f"  snapshot {snapshot}: open at {MEMVIZ}")

        prev = None
        for row in sweep:
            b = row["batch"]
            if prev == "OOM":
                row["error"] = "OOM (a smaller batch already did not fit)"
                continue
            peak = _sweep_point(model, optimizer, cfg, b, device)
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            if peak == "OOM":
                row["error"] = f"OOM at batch {b}"
                prev = "OOM"
                continue
            row["peak_gib"] = _gib(peak)
            if peak is not None:
                row["per_image_gib"] = peak / GIB / b
                if prev is not None:
                    row["marginal_per_image_gib"] = (peak - prev[1]) / GIB / (b - prev[0])
                prev = (b, peak)
    except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
        phase.setdefault("error", error_text(e))
        for row in sweep:
            row.setdefault("error", phase["error"])
    finally:
        del model, optimizer
        free_memory()
    for row in [phase] + sweep:
        if "error" in row and not row["error"].startswith("OOM"):
            print(f"  {variant} {row['mode']} {row['shape']}: {row['error']}")
    return [phase], sweep


def goal_lines(head, sweep_rows, device, gpu_gib):
    if device.type != "cuda":
        return ["- n/a: every goal (CPU run: no device memory is measured)"]
    if head != "pup":
        return ["- n/a: the memory goals are set for PUP"]
    ours = {r["batch"]: r for r in sweep_rows if r["provider"] == OURS}
    row = ours.get(GOAL_BATCH)
    fit = f"batch {GOAL_BATCH} of PUP fits on one {GOAL_GPU_GIB} GB GPU"
    mem = f"per-image peak memory <= {GOAL_MEM_PER_IMAGE_GIB} GB at batch {GOAL_BATCH}"
    if row is None:
        return [f"- n/a: {mem} and {fit} (batch {GOAL_BATCH} not in --batches)"]
    if "error" in row:
        lines = [f"- MISS: {mem} ({row['error']})"]
    else:
        m = row["per_image_gib"]
        lines = [f"- {'PASS' if m <= GOAL_MEM_PER_IMAGE_GIB else 'MISS'}: impl=triton {m:.2f} GB per image "
                 f"at batch {GOAL_BATCH} (goal <= {GOAL_MEM_PER_IMAGE_GIB} GB)"]
    if gpu_gib > GOAL_GPU_GIB + 0.5:
        lines.append(f"- n/a: {fit} (this GPU has {gpu_gib:.0f} GB; rerun with --memory-limit-gb {GOAL_GPU_GIB})")
    else:
        ok = "error" not in row
        lines.append(f"- {'PASS' if ok else 'MISS'}: {fit} (impl=triton, {'ran' if ok else row['error']})")
    return lines


PHASE_COLUMNS = ["provider", "shape", "weights_gib", "grads_gib", "optimizer_state_gib", "inputs_gib",
                 "activations_gib", "saved_activations_gib", "peak_forward_gib", "peak_backward_gib",
                 "peak_optimizer_gib", "peak_gib", "per_image_gib", "mem_saving_vs", "snapshot", "error"]
SWEEP_COLUMNS = ["provider", "batch", "peak_gib", "per_image_gib", "marginal_per_image_gib",
                 "mem_saving_vs", "error"]


def plot_sweep(rows, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for variant in dict.fromkeys(r["provider"] for r in rows):
        pts = [(r["batch"], r["per_image_gib"]) for r in rows
               if r["provider"] == variant and r.get("per_image_gib") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=variant)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no device memory measured (CPU run or every batch failed)", ha="center",
                transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak allocated / batch (GB)")
    ax.set_title(f"{rows[0]['kernel']}: per-image training memory")
    if drawn:
        ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sweep; 1 2 4 8 16 on GPU")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--snapshot", action="store_true", help=f"write a snapshot pickle per variant for {MEMVIZ}")
    return p.parse_args(argv)


def resolve_config(args, device):
    cfg = resolve_model_args(args, device, TINY, FULL)
    cfg["snapshot"] = args.snapshot
    if min(cfg["batches"]) < 1:
        raise ValueError(f"--batches must all be >= 1, got {cfg['batches']}")
    cfg["batches"] = sorted(set(cfg["batches"]))
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--estimate" in argv:  # the planner: any machine, real shapes (bench/memory_estimate.py)
        from bench.memory_estimate import main as estimate_main

        return estimate_main(argv)
    args = parse_args(argv)
    device = common.default_device()
    cfg = resolve_config(args, device)
    common.print_cpu_warning()
    if device.type != "cuda":
        print("memory: no CUDA device, so device memory (peaks, activations) is n/a; weights, grads and "
              "optimizer state are byte counts of the tensors" + ("; no snapshot" if args.snapshot else ""))
    set_memory_limit(args.memory_limit_gb, device)
    outdir = args.out or common.results_dir()
    os.makedirs(outdir, exist_ok=True)
    heads = HEADS if args.head == "all" else (args.head,)
    print(f"memory: {cfg['backbone']} {cfg['img_size']}x{cfg['img_size']} batch {cfg['batch']} "
          f"(sweep {cfg['batches']}) {cfg['dtype']} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
          f"{ours_note(device)}")
    failed = []
    for head in heads:
        phases, sweep = [], []
        for variant in args.variants:
            print(f"[{head}] {variant} ...", flush=True)
            p, s = run_variant(head, variant, cfg, device, outdir)
            phases += p
            sweep += s
        for rows in (phases, sweep):  # peer peak / our peak at the same mode and batch
            common.add_ratios(rows, ours=(OURS,), keys=("mode", "batch"), metric="peak_gib", field="mem_saving_vs")
        paths = common.write_results(f"memory_{head}", phases, PHASE_COLUMNS, outdir)
        sweep_paths = common.write_results(f"memory_sweep_{head}", sweep, SWEEP_COLUMNS, outdir, plot=plot_sweep)
        note = ["GB = 2^30 bytes. activations = forward peak - (weights + optimizer state + inputs)."]
        if device.type != "cuda":
            note.append("CPU run: device memory is n/a; only the tensor byte counts are real.")
        append_section(paths[1], "Notes", note)
        goals = goal_lines(head, sweep, device, gpu_memory_gib(device, args.memory_limit_gb))
        append_section(sweep_paths[1], "Goals", goals)
        print(common.markdown_table(phases, PHASE_COLUMNS))
        print(common.markdown_table(sweep, SWEEP_COLUMNS))
        print("\n".join(goals))
        print("wrote " + ", ".join(paths + sweep_paths))
        failed += [f"{head}/{r['provider']}/{r['mode']}/b{r['batch']}" for r in phases + sweep
                   if "error" in r and not r["error"].startswith("OOM")]
    return common.finish(failed)


if __name__ == "__main__":
    sys.exit(main())
