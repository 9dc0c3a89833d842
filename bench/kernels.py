"""Every kernel microbenchmark in one run: one JSON + markdown table.

    python bench/kernels.py              # all kernels, SETR's shapes and sweeps, on the GPU
    python bench/kernels.py --setr-only  # SETR's training shapes only (bench/gpu_check.py runs this)
    python bench/kernels.py --quick      # small shapes, few repeats (always so on CPU: a smoke test)
    python bench/kernels.py --only attention layer_norm
    python bench/kernels.py --once       # each kernel once, fwd + bwd, bf16, small odd shapes, untimed
    python bench/kernels.py --once all   # the same in float32 too (gpu_check: --once, under compute-sanitizer)

Runs `run(quick, setr_only)` of bench/bench_layer_norm.py, bench_attention.py and bench_upsample.py,
gives each row of ours its speedup over every peer measured in the same run, and writes
kernels.{json,md} to --out (default a new bench/results/kernels/<date>/) after each kernel script.
A kernel script that raises becomes an error row and the run goes on; it exits 1 at the end, as
when a row of ours has an error. Peers that cannot run here (not installed, a CUDA-only backend on
CPU) are left out and listed once, in the output and the results.
"""
import argparse
import importlib
import os
import sys
import traceback

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import OURS, error_text, new_results_dir, run_script, writable_dir

KERNEL_BENCHES = ("layer_norm", "attention", "upsample")  # bench/bench_<name>.py
COLUMNS = ["kernel", "mode", "provider", "shape", "dtype", "ms", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mem_mb",
           "error"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few cases, short timing (always so on CPU)")
    p.add_argument("--setr-only", action="store_true", help="SETR's training shapes only, no sweeps")
    p.add_argument("--only", nargs="+", choices=KERNEL_BENCHES, default=list(KERNEL_BENCHES))
    p.add_argument("--once", nargs="?", const="bf16", choices=("bf16", "all"), help="each kernel once (see above)")
    p.add_argument("--out", default=None, help="output folder (default: a new bench/results/kernels/<date>/)")
    return p.parse_args(argv)


def run_bench(name, quick, setr_only=False):
    """(rows, not_run) of bench/bench_<name>.py, each row tagged with bench=name; an error row if it fails."""
    try:
        module = importlib.import_module(f"bench.bench_{name}")
        rows = [dict(r, bench=name) for r in module.run(quick=quick, setr_only=setr_only)]
        return rows, getattr(module, "unavailable", dict)()  # {peer: why} where a module has peers that may not run
    except Exception as e:  # noqa: BLE001 - reported as a row, the other kernels still run
        traceback.print_exc()
        return [dict(bench=name, kernel=name, mode="-", provider=OURS, shape="-", dtype="-", ms=None,
                     error="benchmark failed: " + error_text(e))], {}


def run_once(dtypes):
    """Every launch our ops make (attention, LayerNorm with and without the residual add, bilinear
    upsample NCHW and channels-last, the fused upsample + cross-entropy) once, forward and backward,
    at small odd shapes in bf16 (dtypes "all": float32 too), for compute-sanitizer. On a GPU the
    attention launches autotune: every config runs."""
    import torch

    from bench.common import default_device
    from setr import layers

    device = default_device()
    for dtype in (torch.float32, torch.bfloat16) if dtypes == "all" else (torch.bfloat16,):
        def leaf(*shape, fmt=torch.contiguous_format):
            return torch.randn(*shape, device=device).to(dtype, memory_format=fmt).requires_grad_()

        w, b, rows = leaf(1000), leaf(1000), lambda: leaf(3, 37, 1000)
        labels = torch.randint(0, 19, (2, 29, 35), device=device)
        labels[:, :3] = 255  # ignored pixels
        ops = {
            # N = 197: two 128-row blocks and a masked tail; odd, like SETR's token counts
            "attention": lambda: layers.attention_packed(leaf(1, 197, 3 * 2 * 64), 2, OURS),
            "layer_norm": lambda: layers.layer_norm(rows(), w, b, 1e-6, OURS),
            "add_layer_norm": lambda: sum(layers.add_layer_norm(rows(), rows(), w, b, 1e-6, OURS)),
            "upsample": lambda: layers.upsample(leaf(3, 5, 7, 9), (13, 17), OURS),
            "upsample channels_last": lambda: layers.upsample(leaf(3, 5, 7, 9, fmt=torch.channels_last), (13, 17),
                                                              OURS),
            "upsample_cross_entropy": lambda: layers.seg_loss(leaf(2, 19, 7, 9), labels, 255, OURS),
        }
        for name, op in ops.items():
            out = op()
            out.backward(torch.randn_like(out))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"ran {name} {str(dtype)[6:]}: forward and backward", flush=True)
    return 0


def main(argv=None):
    args = parse_args(argv)
    out = None if args.once else writable_dir(args.out or new_results_dir("kernels"))
    from bench import common  # torch: after the arguments, so that --help answers at once

    if not common.on_gpu():  # CPU: our kernels through Triton's interpreter (TRITON_INTERPRET=0: the references)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.once:
        return run_once(args.once)
    common.print_cpu_warning()
    quick = args.quick or not common.on_gpu()
    rows, not_run = [], {}
    for name in args.only:
        print(f"[{name}] ...", flush=True)
        new, skipped = run_bench(name, quick, args.setr_only)
        rows += new
        not_run.update(skipped)
        common.add_ratios(rows)
        paths = common.write_results("kernels", rows, COLUMNS, out, not_run=not_run)
    print(common.markdown_table(rows, COLUMNS + ["speedup_vs"]))
    if not_run:
        print(common.not_run_line(not_run))
    print("wrote " + ", ".join(paths))
    return common.finish(common.failure_lines(rows))


if __name__ == "__main__":
    sys.exit(run_script(main))
