"""LayerNorm (and the fused residual-add variant): ours vs torch, apex and torch.compile.

Cases: SETR's shapes (8 and 16 x 1025 x 1024, bf16 and fp32) for layer_norm and add_layer_norm,
and a sweep of widths at 8200 rows in bf16 (`--setr-only`: 8 x 1025 x 1024 bf16). Modes fwd, bwd,
fwd+bwd; median ms and GB/s, each input read and each output written once (bwd also reads the
float32 mean and rstd). "triton" (ours) and "eager" (F.layer_norm, after x + residual for the fused
variant) are setr.layers.layer_norm / add_layer_norm; "apex" is fused_layer_norm_affine (left out,
and said so, when not importable). Run through bench/kernels.py (`--only layer_norm`).
"""
import importlib.util
import math

import torch

from bench import OURS, common
from bench.common import MODES, default_device, on_gpu, time_provider
from setr.layers import add_layer_norm, layer_norm

EPS = 1e-6
SETR_SHAPES = [(8, 1025, 1024), (16, 1025, 1024)]
SWEEP_ROWS = 8200
SWEEP_WIDTHS = [256, 512, 768, 1000, 1024, 1280, 1500, 2048, 4096, 8192]
PROVIDERS = (OURS, "eager", "apex", "torch.compile")


def unavailable():
    """{peer: why} for the peers that cannot run on this machine (left out, said once)."""
    return {} if importlib.util.find_spec("apex") else {"apex": "not installed"}


def _apex_layer_norm():
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    return lambda x, w, b: fused_layer_norm_affine(x, w, b, x.shape[-1:], EPS)


def make_fn(kernel, provider):
    """fn(x, residual, w, b) -> tuple of outputs, for one provider (raises if it cannot run)."""
    if provider == "apex":
        apex_ln = _apex_layer_norm()
        if kernel == "layer_norm":
            return lambda x, r, w, b: (apex_ln(x, w, b),)

        def add_then_norm(x, r, w, b):
            h = x + r
            return h, apex_ln(h, w, b)

        return add_then_norm
    if provider == "torch.compile":
        return common.compiled(make_fn(kernel, "eager"))
    if kernel == "layer_norm":
        return lambda x, r, w, b: (layer_norm(x, w, b, EPS, provider),)
    return lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS, provider)


def traffic_bytes(kernel, mode, shape, dtype):
    """Bytes each input read once and each output written once (params in the activation dtype)."""
    rows, c, size = math.prod(shape[:-1]), shape[-1], dtype.itemsize
    act, par, stats = rows * c * size, c * size, 2 * rows * 4
    if kernel == "layer_norm":
        fwd = 2 * act + 2 * par                    # x, w, b -> y
        bwd = 3 * act + 3 * par + stats            # dy, x, w, mean, rstd -> dx, dw, db
    else:
        fwd = 4 * act + 2 * par                    # x, residual, w, b -> h, y
        bwd = 4 * act + 3 * par + stats            # dh, dy, h, w, mean, rstd -> dx (= dresidual), dw, db
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run_case(kernel, shape, dtype, quick=False):
    device = default_device()
    c = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device=device, dtype=dtype, requires_grad=kernel == "add_layer_norm")
    w = (1 + 0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    inputs = [x, r, w, b] if kernel == "add_layer_norm" else [x, w, b]
    traffic = {mode: traffic_bytes(kernel, mode, shape, dtype) for mode in MODES}
    rows, skip = [], unavailable()
    for provider in [p for p in PROVIDERS if p not in skip]:
        base = dict(kernel=kernel, provider=provider, shape=list(shape), dtype=str(dtype).replace("torch.", ""))
        rows += time_provider(lambda: make_fn(kernel, provider), (x, r, w, b), inputs, base, quick, bytes_moved=traffic)
    return rows


def cases(quick=False, setr_only=False):
    if not on_gpu():
        return [(k, (1, 33, 64), torch.float32) for k in ("layer_norm", "add_layer_norm")]
    if quick or setr_only:
        return [(k, SETR_SHAPES[0], torch.bfloat16) for k in ("layer_norm", "add_layer_norm")]
    out = [(k, s, d) for k in ("layer_norm", "add_layer_norm") for s in SETR_SHAPES
           for d in (torch.bfloat16, torch.float32)]
    out += [("layer_norm", (SWEEP_ROWS, c), torch.bfloat16) for c in SWEEP_WIDTHS]
    return out


def run(quick=False, setr_only=False):
    """All cases; returns the result rows (bench/common.py schema)."""
    rows = []
    for kernel, shape, dtype in cases(quick, setr_only):
        print(f"{kernel} {tuple(shape)} {dtype}", flush=True)
        rows += run_case(kernel, shape, dtype, quick=quick)
    return rows
