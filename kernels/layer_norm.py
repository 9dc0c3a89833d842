"""LayerNorm over the last dimension, forward and backward, with a fused residual-add variant.

    y = (h - mean(h)) * rstd(h) * weight + bias,   rstd = 1 / sqrt(var(h) + eps)
    layer_norm:      h = x
    add_layer_norm:  h = x + residual (rounded to x.dtype, returned too)

Ba, Kiros, Hinton, "Layer Normalization", 2016 (arXiv:1607.06450).

Forward: one program normalizes BLOCK_M rows (one row at ViT-L's width 1024, several for narrow
rows), statistics in float32, mean and rstd saved for backward.
Backward: a fixed grid of ~num_sms * (32 / num_warps) programs, each walking a contiguous
chunk of rows, writes dx and keeps its dweight/dbias partial sums in float32 registers; the
partials land in a (num_programs, C) buffer that one torch sum over dim 0 reduces. No atomics,
so two backward runs give bitwise equal gradients.

Dispatch (kernels/utils.py): CUDA tensors run the compiled kernels, CPU tensors run them through
the Triton interpreter when TRITON_INTERPRET=1 and the plain-PyTorch reference otherwise.
The kernels sit behind torch.library custom ops (namespace "setr_kernels") called from the
autograd Functions, so torch.compile traces through both without graph breaks.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.utils import calculate_settings, check_float, check_triton_op, device_guard, jit, num_sms, use_triton

MAX_WIDTH = 8192            # widest row the backward holds in registers without spilling (sm_90, 16 warps)
FWD_TILE = 1024             # forward: rows per program = max(1, FWD_TILE // next_pow2(C)); one row at C=1024
BWD_TILE = 2048             # backward: rows per loop step = max(1, BWD_TILE // next_pow2(C)), at most BWD_MAX_ROWS
BWD_MAX_ROWS = 4
BWD_WARPS_PER_SM = 32       # backward grid: enough programs for ~32 resident warps per SM


# --- Triton kernels -----------------------------------------------------------------------

@jit
def _layer_norm_fwd_kernel(
    X,          # (M, N) input rows, row stride stride_x, unit column stride
    R,          # (M, N) residual rows (read only when HAS_RESIDUAL)
    H,          # (M, N) out: h = x + residual in X's dtype (written only when HAS_RESIDUAL)
    Y,          # (M, N) out: normalized rows in Y's dtype
    W,          # (N,) weight
    B,          # (N,) bias
    Mean,       # (M,) out: float32 mean of each row
    Rstd,       # (M,) out: float32 1 / sqrt(var + eps) of each row
    stride_x, stride_r, stride_h, stride_y,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]

    # load a (BLOCK_M, BLOCK_N) tile and upcast to float32
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # h = x + residual, rounded to h's storage dtype; the statistics use the stored h
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)

    # statistics in float32: mean, then the variance of the centred values (two passes in registers)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)

    # normalize, scale and shift, write back in the output dtype
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@jit
def _layer_norm_bwd_kernel(
    DY,         # (M, N) gradient of y
    X,          # (M, N) the normalized input (h for the residual variant)
    W,          # (N,) weight
    Mean,       # (M,) float32 saved by the forward
    Rstd,       # (M,) float32 saved by the forward
    DH,         # (M, N) gradient of the h output, added to dx (read only when HAS_DH)
    DX,         # (M, N) out: gradient of x (and of residual for the residual variant)
    DW_partial,  # (num_programs, N) out: float32 per-program sums of dy * xhat
    DB_partial,  # (num_programs, N) out: float32 per-program sums of dy
    stride_dy, stride_x, stride_dh, stride_dx,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # this program owns rows [row_start, row_end), walked BLOCK_M rows at a time
    row_start = pid.to(tl.int64) * rows_per_program
    for step in range(0, rows_per_program, BLOCK_M):
        rows = row_start + step + tl.arange(0, BLOCK_M)
        row_mask = rows < M  # rows_per_program is a multiple of BLOCK_M, so only M cuts a chunk short
        mask = row_mask[:, None] & col_mask[None, :]

        # load dy and x, upcast to float32, rebuild xhat from the saved statistics
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        # dx = rstd * (w*dy - mean(w*dy * xhat) * xhat - mean(w*dy))
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        # accumulate this tile's dweight / dbias contributions in float32 registers
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)

    # one partial row per program; the host sums the partials in a fixed order
    tl.store(DW_partial + pid * N + cols, dw_acc, mask=col_mask)
    tl.store(DB_partial + pid * N + cols, db_acc, mask=col_mask)


# --- launchers ----------------------------------------------------------------------------

def _rows(t, n):
    """View t as (M, n) rows with a unit column stride (copies only when it has to)."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(name, x, weight, bias, residual=None):
    check_float(f"{name}: x", x)
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got a scalar")
    n = x.shape[-1]
    if n > MAX_WIDTH or n < 1:
        raise ValueError(f"{name}: width {n} (x.shape[-1]) is not supported; expected 1 <= width <= {MAX_WIDTH}")
    for pname, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: {pname} must be a tensor of shape ({n},), got {type(p).__name__}")
        check_float(f"{name}: {pname}", p)
        if tuple(p.shape) != (n,):
            raise ValueError(f"{name}: {pname} has shape {tuple(p.shape)}, expected ({n},) to match x.shape[-1]")
        if p.device != x.device:
            raise ValueError(f"{name}: {pname} is on {p.device}, expected x's device {x.device}")
    if residual is not None:
        check_float(f"{name}: residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}, expected x's shape {tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device}, expected x's device {x.device}")


def _fwd_settings(n):
    """(BLOCK_N, BLOCK_M, num_warps) of the forward: one row per program from width 1024 up."""
    block_n, _ = calculate_settings(n, max_block=MAX_WIDTH)
    block_m = max(1, FWD_TILE // block_n)
    _, num_warps = calculate_settings(block_m * block_n)
    return block_n, block_m, num_warps


def _bwd_settings(n):
    """(BLOCK_N, BLOCK_M, num_warps) of the backward: 2 rows x 1024 per step on 8 warps at C=1024,
    about 8 elements per thread per tensor (64-80 registers, no spills with ptxas for sm_90)."""
    block_n, _ = calculate_settings(n, max_block=MAX_WIDTH)
    block_m = min(BWD_MAX_ROWS, max(1, BWD_TILE // block_n))
    num_warps = min(16, max(4, block_m * block_n // 256))
    return block_n, block_m, num_warps


def layer_norm_fwd(x, weight, bias, eps, residual=None):
    """x, residual: (..., C); weight, bias: (C,).

    Returns (y, mean, rstd) or, with a residual, (h, y, mean, rstd): h and y (..., C) in x.dtype,
    mean and rstd (...) in float32.
    """
    n = x.shape[-1]
    x2 = _rows(x, n)
    weight, bias = weight.contiguous(), bias.contiguous()
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    y2 = y.view(-1, n)
    if residual is not None:
        r2 = _rows(residual, n)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h2 = h.view(-1, n)
    else:
        r2, h2 = x2, y2  # unused by the kernel when HAS_RESIDUAL is False
    if m > 0:
        block_n, block_m, num_warps = _fwd_settings(n)
        with device_guard(x):
            _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
                x2, r2, h2, y2, weight, bias, mean, rstd,
                x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0),
                m, n, eps,
                HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )
    if residual is not None:
        return h, y, mean, rstd
    return y, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, dh=None):
    """dy, x, dh: (..., C); weight: (C,); mean, rstd: (...) float32.

    Returns (dx, dweight, dbias): dx (..., C) in x.dtype (plus dh when given), dweight and dbias
    (C,) in float32 (the caller casts each once, to its parameter's dtype).
    """
    n = x.shape[-1]
    x2 = _rows(x, n)
    dy2 = _rows(dy, n)
    weight, mean, rstd = weight.contiguous(), mean.contiguous(), rstd.contiguous()
    dh2 = _rows(dh, n) if dh is not None else dy2  # unused by the kernel when HAS_DH is False
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, n)
    if m == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    block_n, block_m, num_warps = _bwd_settings(n)
    tiles = triton.cdiv(m, block_m)
    programs = min(num_sms(x.device) * max(1, BWD_WARPS_PER_SM // num_warps), tiles)
    rows_per_program = triton.cdiv(tiles, programs) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _layer_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, mean, rstd, dh2, dx2, dw_partial, db_partial,
            dy2.stride(0), x2.stride(0), dh2.stride(0), dx2.stride(0),
            m, n, rows_per_program,
            HAS_DH=dh is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    # second stage: a fixed-order float32 sum over the partial rows (deterministic)
    return dx, dw_partial.sum(dim=0), db_partial.sum(dim=0)


# --- torch.library custom ops (opaque to torch.compile, with shape-only fake versions) -----

@torch.library.custom_op("setr_kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_op("layer_norm_fwd", "kernels.layer_norm.layer_norm", x, weight, bias)
    return layer_norm_fwd(x, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("setr_kernels::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_op("add_layer_norm_fwd", "kernels.layer_norm.add_layer_norm", x, residual, weight, bias)
    return layer_norm_fwd(x, weight, bias, eps, residual=residual)


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("setr_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, dh: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_op("layer_norm_bwd", "kernels.layer_norm.layer_norm", dy, x, weight, mean, rstd)
    return layer_norm_bwd(dy, x, weight, mean, rstd, dh)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, dh):
    return x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32), \
        weight.new_empty(weight.shape, dtype=torch.float32)


# --- autograd -----------------------------------------------------------------------------

class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.ops.setr_kernels.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.setr_kernels.layer_norm_bwd(dy, x, weight, mean, rstd, None)
        return dx, dw.to(weight.dtype), db.to(ctx.bias_dtype), None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        h, y, mean, rstd = torch.ops.setr_kernels.add_layer_norm_fwd(x, residual, weight, bias, eps)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.residual_dtype = residual.dtype
        ctx.bias_dtype = bias.dtype
        ctx.set_materialize_grads(False)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        # dh_total = dh + d layer_norm(h) / dh, written by the kernel in one pass; x and residual share it
        dh_total, dw, db = torch.ops.setr_kernels.layer_norm_bwd(dy, h, weight, mean, rstd, dh)
        return dh_total, dh_total.to(ctx.residual_dtype), dw.to(weight.dtype), db.to(ctx.bias_dtype), None


# --- public API ---------------------------------------------------------------------------

def layer_norm(x, weight, bias, eps=1e-6):
    """LayerNorm over the last dim. x: (..., C) float32/bfloat16/float16; weight, bias: (C,), each
    float32/bfloat16/float16. Returns y (..., C) in x.dtype; gradients of weight/bias come back in their dtype."""
    _check("layer_norm", x, weight, bias)
    if not use_triton(x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps=1e-6):
    """h = x + residual (in x.dtype); y = layer_norm(h). x, residual: (..., C). Returns (h, y),
    both (..., C) in x.dtype, computed in one pass; gradients flow to x and residual."""
    _check("add_layer_norm", x, weight, bias, residual)
    if not use_triton(x, residual, weight, bias):
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps)


# --- plain-PyTorch reference ----------------------------------------------------------------

def layer_norm_reference(x, weight, bias, eps=1e-6):
    """Same contract as layer_norm, computed in float32 (float64 for float64 input)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(compute) + bias.to(compute)
    return y.to(x.dtype)


def add_layer_norm_reference(x, residual, weight, bias, eps=1e-6):
    """Same contract as add_layer_norm: h = (x + residual) in x.dtype, y = layer_norm_reference(h)."""
    h = (x + residual).to(x.dtype)
    return h, layer_norm_reference(h, weight, bias, eps)
