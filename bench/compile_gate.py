"""Compile gate: every Triton kernel launch our launchers make at SETR's shapes, with every autotune
config, compiled for Hopper (sm_90a) and Ampere (sm_80) on the CPU with Triton's own compiler.

    python -m bench.compile_gate --all     # compile everything, rewrite bench/results/compile/
    python -m bench.compile_gate           # CI: check the table is current, recompile a subset

The launchers run on CPU tensors of the real shapes (nothing executes): each launch is captured,
bound by Triton's own argument specialization for a CUDA target as a real launch would be (16-byte
aligned pointers, ints divisible by 16, constexprs, every autotune config) and compiled with ptxas
-v: registers, spill bytes, shared memory against the target's limit, wgmma / mma.sync counts, an
estimated occupancy. Gate (exit status 1): a compile error; spills in a bf16/fp16 launch the
autotuner can pick on sm_90a, and in bf16/fp16 attention at D=64 on sm_80; attention without
wgmma on sm_90a or mma on sm_80. A row's key hashes the kernel's source (and its @triton.jit
helpers'), specialization, options and Triton version: CI fails when the committed keys are not
the current launches' (run --all and commit); `--all --reuse` recompiles only changed keys.
"""
import argparse
import atexit
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import RESULTS, run_script, setr_crops, setr_tokens, writable_dir  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="compile every launch, write the table (default: check it)")
    p.add_argument("--reuse", action="store_true", help="with --all: keep the existing rows whose key is unchanged")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes (default: all cores)")
    p.add_argument("--out", default=os.path.join(RESULTS, "compile"), help="table folder (bench/results/compile)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer before torch and triton are imported (below)
# compile, never interpret: triton itself decides at its import whether triton.language's own jit
# functions (tl.cdiv, ...) are interpreted; and a private cache (removed at exit) so that ptxas runs
# and logs every kernel
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="setr_compile_gate_")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from setr.constants import PATCH_SIZE  # noqa: E402
from setr.files import write_atomic  # noqa: E402

attn = importlib.import_module("kernels.attention")
ln = importlib.import_module("kernels.layer_norm")
up = importlib.import_module("kernels.upsample")
uce = importlib.import_module("kernels.upsample_cross_entropy")

# capability, SMs of the flagship part (the LayerNorm backward grid), largest opt-in shared memory
# per block, shared memory per SM (Triton skips a config whose shared memory exceeds the block limit)
TARGETS = {
    "sm_90a": dict(capability=90, sms=132, smem_block=232448, smem_sm=233472),  # H100 SXM
    "sm_80": dict(capability=80, sms=108, smem_block=166912, smem_sm=167936),   # A100
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
BATCH, HEADS = 8, 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- the launches, as the launchers make them ---------------------------------------------------

# SETR's crops and classes (bench.setr_crops) and token counts with the class token: 1025, 2305, 901
CROPS = setr_crops()
TOKENS = setr_tokens()


def attention_cases():
    """(name, dtype, launcher call): ViT-L's attention (B=8, H=16, D=64) at every crop's token count
    and at 1024 (no class token), plus head dims 32 and 128, float32 for the table. The autotune
    key buckets token counts; the kernels specialize on them only by divisibility by 16, so the
    token counts of all crops share compiles."""
    cases = [(dt, 64, n) for dt in ("bf16", "fp16") for n in TOKENS + [1024]]
    cases += [(dt, d, TOKENS[0]) for d in (32, 128) for dt in ("bf16", "fp16")] + [("fp32", 64, TOKENS[0])]
    for dt, d, n in cases:
        def run(dt=dt, d=d, n=n):
            qkv = torch.empty(BATCH, n, 3 * HEADS * d, dtype=DTYPES[dt])
            out, lse = attn.attention_packed_fwd(qkv, HEADS, d ** -0.5)
            attn.attention_packed_bwd(torch.empty_like(out), qkv, out, lse, HEADS, d ** -0.5)
        yield f"attention B={BATCH} H={HEADS} N={n} D={d}", dt, run


def layer_norm_cases():
    """The ViT's LayerNorms (B x tokens rows x 1024, plain and with the residual add) at every crop,
    widths 1500 and 8192."""
    cases = [("bf16", m, 1024) for m in TOKENS] + [("fp32", TOKENS[0], 1024), ("bf16", TOKENS[0], 1500),
                                                     ("bf16", TOKENS[0], 8192)]
    for dt, tokens, width in cases:
        def run(dt=dt, tokens=tokens, width=width):
            x = torch.empty(BATCH * tokens, width, dtype=DTYPES[dt])
            w, b = torch.empty(width), torch.empty(width)
            for residual in (None, torch.empty_like(x)):
                *_, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-6, residual=residual)
                ln.layer_norm_bwd(torch.empty_like(x), x, w, mean, rstd, dh=residual)
        yield f"layer_norm M={BATCH * tokens} C={width}", dt, run


def resize_shapes(crop, classes):
    """(channels, in, out) of the heads' bilinear resizes at this crop (features at crop / 16): PUP
    decode x2 steps, Naive/PUP aux and MLA x4 (256 channels), Naive and MLA decode logits x4 before
    the fused loss, inference logits to the image size; and the fused loss's (classes, logits side,
    label side) of Naive/PUP aux/MLA, PUP decode, MLA aux."""
    f = crop // PATCH_SIZE
    return (((256, f, 2 * f), (256, 2 * f, 4 * f), (256, 4 * f, 8 * f), (256, f, 4 * f), (classes, f, 4 * f),
             (classes, 4 * f, crop)), ((classes, 4 * f, crop), (classes, 8 * f, crop), (classes, f, crop)))


def upsample_cases():
    for (crop, classes), dt in [(c, "bf16") for c in CROPS] + [(CROPS[0], "fp32")]:
        upsamples, losses = resize_shapes(crop, classes)
        for c, n_in, n_out in upsamples:
            for layout in ("nchw", "channels_last"):
                def run(dt=dt, c=c, n_in=n_in, n_out=n_out, layout=layout):
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    x = torch.empty(BATCH, c, n_in, n_in, dtype=DTYPES[dt], memory_format=fmt)
                    y = up.upsample_bilinear_fwd(x, n_out, n_out, False)
                    up.upsample_bilinear_bwd(y, n_in, n_in, False, layout == "channels_last")
                yield f"upsample B={BATCH} C={c} {n_in}->{n_out} {layout}", dt, run
        for c, n_in, n_out in losses:
            def run(dt=dt, c=c, n_in=n_in, n_out=n_out):
                logits = torch.empty(BATCH, c, n_in, n_in, dtype=DTYPES[dt])
                labels = torch.empty(BATCH, n_out, n_out, dtype=torch.int64)
                _, _, _, lse = uce.upsample_cross_entropy_fwd(logits, labels, 255, False)
                uce.upsample_cross_entropy_bwd(logits, labels, lse, torch.ones(()), 255, False)
            yield f"upsample_cross_entropy B={BATCH} C={c} {n_in}->{n_out}", dt, run


def capture(run, sms):
    """[(kernel JITFunction, args, kwargs per config)] of the launches `run()` makes, none executed."""
    launches = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, [kwargs]))

    def tuner_run(self, *args, grid, warmup, **kwargs):  # the configs this launch's autotuning tries
        self.nargs = dict(zip(self.arg_names, args))
        configs = [{**kwargs, **cfg.all_kwargs()} for cfg in self.prune_configs(kwargs)]
        launches.append((self.fn, args, configs))

    saved = JITFunction.run, Autotuner.run, ln.num_sms
    JITFunction.run, Autotuner.run, ln.num_sms = jit_run, tuner_run, lambda device: sms
    try:
        run()
    finally:
        JITFunction.run, Autotuner.run, ln.num_sms = saved
    return launches


# --- binding and compiling ------------------------------------------------------------------------

def source_hash(fn, seen=None):
    """sha256 of a @triton.jit function's source and of every @triton.jit helper it calls, recursively."""
    seen = set() if seen is None else seen
    seen.add(fn.__name__)
    parts = [fn.src]
    for name, value in sorted(fn.__globals__.items()):
        if isinstance(value, JITFunction) and name not in seen and re.search(rf"\b{name}\b", fn.src):
            parts.append(source_hash(value, seen))
        elif isinstance(value, triton.language.constexpr) and re.search(rf"\b{name}\b", fn.src):
            parts.append(f"{name}={value.value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def bind(fn, args, kwargs, target):
    """What a real launch on `target` compiles: (signature, constexprs, attrs, options) by Triton's binder."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"debug": False, "instrumentation_mode": "", **kwargs}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def jobs(arch, cases):
    """One compile job per distinct (kernel, specialization, options) of the cases' launches on arch."""
    target = GPUTarget("cuda", TARGETS[arch]["capability"], 32)
    out = {}
    for case, dtype, run in cases:
        for fn, args, configs in capture(run, TARGETS[arch]["sms"]):
            for kwargs in configs:
                signature, constexprs, attrs, options = bind(fn, args, kwargs, target)
                consts = {fn.arg_names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
                config = {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C", "BLOCK_H", "BLOCK_W") if k in consts}
                config.update(num_warps=options.num_warps, num_stages=options.num_stages)
                key_text = repr((source_hash(fn), sorted(signature.items()), sorted(consts.items()),
                                 sorted(attrs.items()), options.num_warps, options.num_stages, options.num_ctas, arch,
                                 triton.__version__))
                key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
                if key in out:  # the same compile serves several cases
                    out[key]["case"] += "" if case in out[key]["case"] else f"; {case}"
                    continue
                job = (fn.__module__, fn.__name__, signature, constexprs, attrs, options.__dict__,
                       TARGETS[arch]["capability"])
                out[key] = dict(key=key, arch=arch, kernel=fn.__name__, case=case, dtype=dtype, config=config,
                                autotuned=len(configs) > 1, job=job)
    return list(out.values())


MEASURED = ("regs", "spill_stores", "spill_loads", "smem", "wgmma", "mma", "error", "seconds")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job):
    """Compile one kernel; returns its measurements (or the error)."""
    module, name, signature, constexprs, attrs, options, capability = job
    fn = getattr(importlib.import_module(module), name)
    fn = fn.fn if isinstance(fn, Autotuner) else fn
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as e:  # the gate reports every failure, it does not stop at the first
        return dict(error=f"{type(e).__name__}: {str(e)[:2000]}", seconds=time.perf_counter() - t0)
    text = log.getvalue()
    spills = [tuple(map(int, m)) for m in PTXAS_SPILL.findall(text)]
    ptx = kernel.asm["ptx"]
    return dict(regs=max(map(int, PTXAS_REGS.findall(text)), default=None),
                spill_stores=sum(s for s, _ in spills), spill_loads=sum(lo for _, lo in spills),
                smem=kernel.metadata.shared, wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync"),
                seconds=round(time.perf_counter() - t0, 2))


def occupancy(row, arch):
    """Estimated resident warps / 64 per SM from registers (256-register warp granules), shared
    memory (plus 1 KiB reserved per block) and the warp limit."""
    t = TARGETS[arch]
    warps = row["config"]["num_warps"]
    regs_per_warp = math.ceil(row["regs"] * 32 / 256) * 256
    blocks = min(REGS_PER_SM // regs_per_warp // warps, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM,
                 t["smem_sm"] // (row["smem"] + 1024))
    return round(blocks * warps / MAX_WARPS_PER_SM, 3)


def gate_reasons(row):
    """Why a row fails the gate (empty: it passes)."""
    if "error" in row:
        return ["compile error"]
    reasons = []
    pickable = row["smem"] <= TARGETS[row["arch"]]["smem_block"]
    attention_d64 = row["kernel"].startswith("_attn") and " D=64" in row["case"]
    gated = row["dtype"] in ("bf16", "fp16") and (row["arch"] == "sm_90a" or attention_d64)
    if gated and pickable and row["spill_stores"] + row["spill_loads"] > 0:
        reasons.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes (stores/loads)")
    matmul = row["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    if matmul and pickable and not row["wgmma" if row["arch"] == "sm_90a" else "mma"]:
        reasons.append("no wgmma" if row["arch"] == "sm_90a" else "no mma")
    return reasons


# --- the table ----------------------------------------------------------------------------------

COLUMNS = ["arch", "kernel", "case", "dtype", "config", "regs", "spill_stores", "spill_loads", "smem", "smem_limit",
           "wgmma", "mma", "occupancy", "gate"]


def all_cases():
    return [*attention_cases(), *layer_norm_cases(), *upsample_cases()]


def compile_rows(rows, workers, known=None):
    """Compile the rows' jobs (in `workers` processes) and fill in their measurements. Rows whose
    key is in `known` (rows of an earlier table) take its measurements: same key, same compile."""
    known = known or {}
    todo = [r for r in rows if r["key"] not in known]
    for r in rows:
        if r["key"] in known:
            r.update({k: known[r["key"]][k] for k in MEASURED if k in known[r["key"]]})
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for i, (row, result) in enumerate(zip(todo, pool.map(compile_job, [r["job"] for r in todo]))):
            row.update(result)
            print(f"[{i + 1}/{len(todo)}] {row['arch']} {row['kernel']} {row['case']} {row['dtype']} {row['config']}: "
                  f"{row.get('regs')} regs, spills {row.get('spill_stores')}, {row.get('error', '')[:200]}", flush=True)
    for row in rows:
        row["smem_limit"] = TARGETS[row["arch"]]["smem_block"]
        if "error" not in row:
            row["occupancy"] = occupancy(row, row["arch"])
        row["gate"] = "; ".join(gate_reasons(row)) or "ok"
    return rows


def write_table(rows, outdir, seconds, compiled):
    meta = dict(triton=triton.__version__, torch=torch.__version__, compiles=len(rows),
                compile_core_seconds=round(sum(r.get("seconds", 0) for r in rows)),
                last_run=f"{compiled} compiled, {len(rows) - compiled} reused, {seconds:.0f} s",
                regenerate="python -m bench.compile_gate --all")
    path = os.path.join(outdir, "compile.json")
    public = [{k: v for k, v in r.items() if k != "job"} for r in rows]
    write_atomic(path, json.dumps({"meta": meta, "rows": public}, indent=1))
    lines = ["# Compile gate: every kernel launch at SETR's shapes, every autotune config", "",
             f"`{meta['regenerate']}` (Triton {meta['triton']}, {len(rows)} compiles, "
             f"{meta['compile_core_seconds']} core-seconds of compiling). "
             "smem and smem_limit in bytes (a config over the limit is never picked by the autotuner); "
             "spills in bytes; occupancy = estimated resident warps / 64 per SM; tensor-core ops = wgmma "
             "(sm_90a) or mma.sync (sm_80) instructions in the PTX.", ""]
    fmt = lambda r: {**r, "config": " ".join(f"{k}={v}" for k, v in r["config"].items())}
    write_atomic(os.path.join(outdir, "compile.md"),
                 "\n".join(lines) + "\n" + markdown_table([fmt(r) for r in rows], COLUMNS) + "\n")


def subset(committed):
    """The CI subset: per kernel, the committed row with the most registers on either arch (the
    likeliest to change, or to spill, after a toolchain change)."""
    best = {}
    for r in committed:
        if "error" not in r and (r["kernel"] not in best or r["regs"] > best[r["kernel"]]["regs"]):
            best[r["kernel"]] = r
    return set(r["key"] for r in best.values())


def check_against(rows, committed_path, workers):
    """CI mode: the committed table must hold exactly the current launches; recompile a subset and
    compare its numbers. Returns (rows with the committed numbers, failures)."""
    if not os.path.exists(committed_path):
        return [], [f"{committed_path} not found: run `python -m bench.compile_gate --all` and commit the table"]
    with open(committed_path) as f:
        committed = {r["key"]: r for r in json.load(f)["rows"]}
    current = {r["key"]: r for r in rows}
    stale = sorted(set(current) ^ set(committed))
    if stale:
        return [], [f"{committed_path} is stale ({len(stale)} launches changed: kernel source, configs or "
                    "specialization); run `python -m bench.compile_gate --all` and commit the table"]
    fresh = compile_rows([current[k] for k in sorted(subset(committed.values()))], workers)
    failures = []
    for r in fresh:
        old = committed[r["key"]]
        for field in ("regs", "spill_stores", "spill_loads", "smem", "wgmma", "mma", "error"):
            if r.get(field) != old.get(field):
                failures.append(f"{r['arch']} {r['kernel']} {r['case']} {r['config']}: {field} {r.get(field)} "
                                f"!= committed {old.get(field)}")
    return list(committed.values()), failures


def main(argv=None):
    args = parse_args(argv)
    writable_dir(args.out)  # before minutes of compiling
    t0 = time.perf_counter()
    rows = [r for arch in TARGETS for r in jobs(arch, all_cases())]
    if args.all:
        known = {}
        table = os.path.join(args.out, "compile.json")
        if args.reuse and os.path.exists(table):
            with open(table) as f:
                known = {r["key"]: r for r in json.load(f)["rows"]}
        rows = compile_rows(rows, args.jobs, known)
        compiled = sum(r["key"] not in known for r in rows)
        write_table(rows, args.out, time.perf_counter() - t0, compiled)
        failures = []
        print(f"compiled {compiled} kernels, reused {len(rows) - compiled}, in {time.perf_counter() - t0:.0f} s; "
              f"wrote {args.out}")
    else:
        rows, failures = check_against(rows, os.path.join(args.out, "compile.json"), args.jobs)
        print(f"checked the committed table, recompiled {len(subset(rows))} kernels "
              f"in {time.perf_counter() - t0:.0f} s")
    for r in rows:  # the gate judged again: a committed row's verdict may predate today's rule
        r["gate"] = "; ".join(gate_reasons(r)) or "ok"
    failures += [f"{r['arch']} {r['kernel']} {r['case']} {r['dtype']} {r['config']}: {r['gate']}"
                 for r in rows if r["gate"] != "ok"]
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
