"""Bilinear upsampling with F.interpolate's semantics, forward and backward.

    upsample_bilinear(x, size):  y[b, c, oy, ox] = bilinear mix of the 4 source pixels of (oy, ox)

Source indices follow PyTorch's `area_pixel_compute_scale` / `area_pixel_compute_source_index`
exactly (scale from the sizes, in / out, or (in - 1) / (out - 1) with align_corners; source
clamped at 0 without align_corners; second source clamped at the border). They live in small
per-axis tables, built once per (in, out, align_corners, device) in float32 as PyTorch's CUDA
kernel computes them:
    i0[j]     first source index of output index j (int32); the second is i1 = min(i0 + 1, in - 1)
    lam[j]    weight of i1 (float32); i0 gets 1 - lam
    start[i]  first output index whose footprint holds source index i (int32)
    window    most output indices holding one source index (2 * s per axis at an integer scale s)

Forward: each program computes a tile of output pixels (BLOCK_H x BLOCK_W, flattened) for
BLOCK_C channels from the 4 source pixels, weights and sums in float32. NCHW tiles are wide in W
and channels-last tiles wide in C, so loads and stores are coalesced in both layouts.
Backward (the transpose) is a gather, not a scatter: each program owns a tile of input pixels
and walks the window x window output pixels whose footprint may hold them (exact from the
tables for any scale, clamping included), adding dy * weight in float32 registers. No atomics,
so two runs give bitwise equal gradients. The windows are compile-time constants: at SETR's
integer scales (x2, x4) they are exactly 2 * scale per axis, the loops have fixed trip counts
and no iteration is wasted; any other size takes the same kernels with its own exact window.
The per-axis tables, the pixel tiling and the 4-tap blend are shared with the fused
upsample + cross-entropy (kernels/upsample_cross_entropy.py), so both upsample alike.

Dispatch (kernels/utils.py): CUDA tensors run the compiled kernels, CPU tensors run them through
the Triton interpreter when TRITON_INTERPRET=1 and the plain-PyTorch reference otherwise. The
kernels sit behind torch.library custom ops (namespace "setr_kernels") with fake versions, called
from the autograd Function, so torch.compile traces through without graph breaks.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.utils import check_float, check_triton_op, device_guard, jit, launch_mode, use_triton

# Elements (channels x pixels) per program of the upsample kernels, by launch_mode. The interpreter
# pays per program and per op, not per element, so it gets the largest tiles (the kernels are the same).
FWD_TILE = {"compiled": 2048, "interpreted": 1 << 16}
BWD_TILE = {"compiled": 1024, "interpreted": 1 << 16}


# --- Triton kernels -----------------------------------------------------------------------

@jit
def pixel_tile(tile, n_rows, n_cols, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(rows, cols, mask), each (BLOCK_H * BLOCK_W,): pixel tile number `tile` of an n_rows x n_cols
    map cut row-major into BLOCK_H x BLOCK_W tiles."""
    n_wb = tl.cdiv(n_cols, BLOCK_W)
    if BLOCK_H == 1:  # one row: plain aranges keep the column contiguity visible to the compiler
        rows = tl.zeros((BLOCK_W,), dtype=tl.int32) + tile // n_wb
        cols = (tile % n_wb) * BLOCK_W + tl.arange(0, BLOCK_W)
    else:
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        rows = (tile // n_wb) * BLOCK_H + p // BLOCK_W
        cols = (tile % n_wb) * BLOCK_W + p % BLOCK_W
    return rows, cols, (rows < n_rows) & (cols < n_cols)



@jit
def window_tap(start, k, i, n_out, n_in, I0, LAM):
    """Tap k of the backward's footprint window of input index i (the window starts at output
    index `start`): (output index clamped to the map, its first source index, its weight lam,
    and its blend weight on i; 0 past the map's end). I0, LAM: the axis tables (n_out,)."""
    o = start + k
    oc = tl.minimum(o, n_out - 1)
    i0 = tl.load(I0 + oc)
    lam = tl.load(LAM + oc)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    weight = tl.where(i0 == i, 1.0 - lam, 0.0) + tl.where(i1 == i, lam, 0.0)
    return oc, i0, lam, tl.where(o < n_out, weight, 0.0)


@jit
def blend4(a, b, c, d, lx, ly):
    """Bilinear blend of the 4 source values (float32): a, b on the first source row, c, d on the
    second; lx weights the second column (b, d), ly the second row. Along x first, then y."""
    top = a + lx * (b - a)
    bot = c + lx * (d - c)
    return top + ly * (bot - top)


@jit
def _upsample_fwd_kernel(
    X,          # (B, C, H, W) input, strides (sxb, sxc, sxh, sxw): NCHW, channels-last or any
    Y,          # (B, C, OH, OW) out, strides (syb, syc, syh, syw)
    Y0,         # (OH,) int32 first source row of each output row
    LY,         # (OH,) float32 weight of the second source row
    X0,         # (OW,) int32 first source column of each output column
    LX,         # (OW,) float32 weight of the second source column
    C, H, W, OH, OW,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # program -> (batch, channel block, pixel tile); pixel tiles vary fastest
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(OH, BLOCK_H) * tl.cdiv(OW, BLOCK_W)
    n_cb = tl.cdiv(C, BLOCK_C)
    tile = pid % n_tiles
    cb = (pid // n_tiles) % n_cb
    b = (pid // (n_tiles * n_cb)).to(tl.int64)
    oy, ox, mask_p = pixel_tile(tile, OH, OW, BLOCK_H, BLOCK_W)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (c < C)[:, None] & mask_p[None, :]

    # source rows/columns of every output pixel and their float32 weights, from the tables
    y0 = tl.load(Y0 + oy, mask=mask_p, other=0)
    ly = tl.load(LY + oy, mask=mask_p, other=0.0)
    y1 = tl.minimum(y0 + 1, H - 1)
    x0 = tl.load(X0 + ox, mask=mask_p, other=0)
    lx = tl.load(LX + ox, mask=mask_p, other=0.0)
    x1 = tl.minimum(x0 + 1, W - 1)

    # load the 4 source pixels, upcast to float32
    base = X + b * sxb + c[:, None] * sxc
    r0 = y0.to(tl.int64) * sxh
    r1 = y1.to(tl.int64) * sxh
    a = tl.load(base + (r0 + x0 * sxw)[None, :], mask=mask, other=0.0).to(tl.float32)
    bb = tl.load(base + (r0 + x1 * sxw)[None, :], mask=mask, other=0.0).to(tl.float32)
    cc = tl.load(base + (r1 + x0 * sxw)[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.load(base + (r1 + x1 * sxw)[None, :], mask=mask, other=0.0).to(tl.float32)

    # interpolate, write back in the output dtype
    y = blend4(a, bb, cc, d, lx[None, :], ly[None, :])
    out = Y + b * syb + c[:, None] * syc + (oy.to(tl.int64) * syh + ox * syw)[None, :]
    tl.store(out, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _upsample_bwd_kernel(
    DY,         # (B, C, OH, OW) gradient of the output, strides (sdb, sdc, sdh, sdw), any (even 0)
    DX,         # (B, C, H, W) out: gradient of the input, strides (sxb, sxc, sxh, sxw)
    Y0, LY,     # (OH,) output-row tables, as in the forward
    X0, LX,     # (OW,) output-column tables, as in the forward
    YS,         # (H,) int32 first output row whose footprint holds each input row
    XS,         # (W,) int32 first output column whose footprint holds each input column
    C, H, W, OH, OW,
    sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw,
    WIN_Y: tl.constexpr,
    WIN_X: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # program -> (batch, channel block, tile of input pixels)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_H) * tl.cdiv(W, BLOCK_W)
    n_cb = tl.cdiv(C, BLOCK_C)
    tile = pid % n_tiles
    cb = (pid // n_tiles) % n_cb
    b = (pid // (n_tiles * n_cb)).to(tl.int64)
    iy, ix, mask_p = pixel_tile(tile, H, W, BLOCK_H, BLOCK_W)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = c < C
    ys = tl.load(YS + iy, mask=mask_p, other=0)
    xs = tl.load(XS + ix, mask=mask_p, other=0)
    dy_base = DY + b * sdb + c[:, None] * sdc
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)

    for k in range(WIN_X):
        # output column k of each input pixel's window, and its weight onto the input column
        oxc, _, _, wx = window_tap(xs, k, ix, OW, W, X0, LX)
        wx = tl.where(mask_p, wx, 0.0)
        for j in range(WIN_Y):
            # output row j of the window, and its weight onto the input row
            oyc, _, _, wy = window_tap(ys, j, iy, OH, H, Y0, LY)
            # gather dy where the weight is non-zero, accumulate in float32
            wgt = wx * wy
            m = mask_c[:, None] & (wgt != 0.0)[None, :]
            g = tl.load(dy_base + (oyc.to(tl.int64) * sdh + oxc * sdw)[None, :], mask=m, other=0.0)
            acc += g.to(tl.float32) * wgt[None, :]

    out = DX + b * sxb + c[:, None] * sxc + (iy.to(tl.int64) * sxh + ix * sxw)[None, :]
    tl.store(out, acc.to(DX.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])



# --- index tables and launchers -------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def axis_tables(n_in, n_out, align_corners, device):
    """Per-axis tables (i0, lam, start, window) for resizing n_in -> n_out; see the module docstring.

    float32 arithmetic, as PyTorch's kernels do it (area_pixel_compute_scale / _source_index).
    """
    j = torch.arange(n_out, dtype=torch.float32)
    if align_corners:
        scale = torch.tensor(float(n_in - 1)) / float(n_out - 1) if n_out > 1 else torch.tensor(0.0)
        src = scale * j
    else:
        scale = torch.tensor(float(n_in)) / float(n_out)
        src = (scale * (j + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    lam = (src - i0).clamp(0.0, 1.0)
    # the outputs giving source i a non-zero weight (as i0 with 1 - lam, or as i1 with lam) form one
    # range per i, since i0 never decreases: record its start and the longest range
    j = torch.arange(n_out)
    start = torch.full((n_in,), n_out, dtype=torch.long)
    end = torch.zeros(n_in, dtype=torch.long)
    for src_index, weight in ((i0, 1 - lam), (torch.clamp(i0 + 1, max=n_in - 1), lam)):
        nz = weight > 0
        start.scatter_reduce_(0, src_index[nz], j[nz], "amin")
        end.scatter_reduce_(0, src_index[nz], j[nz] + 1, "amax")
    window = max(1, int((end - start).max()))
    return i0.int().to(device), lam.to(device), start.int().to(device), window


def is_channels_last(x):
    """True when x is laid out channels-last (and not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def empty_in_layout(shape, like, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def _tile(c, rows, cols, channels_last, elements):
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) of an upsample kernel: about `elements` per program,
    wide along the contiguous axis first (W for NCHW, C for channels-last)."""
    p2 = triton.next_power_of_2
    if channels_last:
        block_c = min(p2(c), 256, elements)
        block_w = min(p2(cols), max(1, elements // block_c))
    else:
        block_w = min(p2(cols), 256, elements)
        block_c = min(p2(c), max(1, elements // block_w))
    block_h = min(p2(rows), max(1, elements // (block_c * block_w)))
    return block_c, block_h, block_w, 8 if block_c * block_h * block_w >= 2048 else 4



def upsample_bilinear_fwd(x, out_h, out_w, align_corners):
    """x: (B, C, H, W) -> y: (B, C, out_h, out_w) in x.dtype and x's memory format."""
    B, C, H, W = x.shape
    cl = is_channels_last(x)
    y = empty_in_layout((B, C, out_h, out_w), x, x.dtype, cl)
    if y.numel() == 0:
        return y
    y0, ly, _, _ = axis_tables(H, out_h, align_corners, x.device)
    x0, lx, _, _ = axis_tables(W, out_w, align_corners, x.device)
    block_c, block_h, block_w, num_warps = _tile(C, out_h, out_w, cl, FWD_TILE[launch_mode(x)])
    tiles = triton.cdiv(out_h, block_h) * triton.cdiv(out_w, block_w)
    with device_guard(x):
        _upsample_fwd_kernel[(B * triton.cdiv(C, block_c) * tiles,)](
            x, y, y0, ly, x0, lx,
            C, H, W, out_h, out_w,
            *x.stride(), *y.stride(),
            BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
        )
    return y


def upsample_bilinear_bwd(dy, in_h, in_w, align_corners, channels_last):
    """dy: (B, C, OH, OW) -> dx: (B, C, in_h, in_w) in dy.dtype, channels-last when asked."""
    B, C, OH, OW = dy.shape
    dx = empty_in_layout((B, C, in_h, in_w), dy, dy.dtype, channels_last)
    if dx.numel() == 0:
        return dx
    y0, ly, ys, win_y = axis_tables(in_h, OH, align_corners, dy.device)
    x0, lx, xs, win_x = axis_tables(in_w, OW, align_corners, dy.device)
    block_c, block_h, block_w, num_warps = _tile(C, in_h, in_w, channels_last, BWD_TILE[launch_mode(dy)])
    tiles = triton.cdiv(in_h, block_h) * triton.cdiv(in_w, block_w)
    with device_guard(dy):
        _upsample_bwd_kernel[(B * triton.cdiv(C, block_c) * tiles,)](
            dy, dx, y0, ly, x0, lx, ys, xs,
            C, in_h, in_w, OH, OW,
            *dy.stride(), *dx.stride(),
            WIN_Y=win_y, WIN_X=win_x, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
        )
    return dx



# --- input checks -----------------------------------------------------------------------------

def _check_size(name, x, size):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name}: x has an empty spatial size {tuple(x.shape[2:])}")
    if isinstance(size, int):
        size = (size, size)
    try:
        size = tuple(int(s) for s in size)
    except TypeError:
        raise TypeError(f"{name}: size must be an int or a pair of ints (out_h, out_w), got {size!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name}: size must be two positive ints (out_h, out_w), got {size}")
    return size



# --- torch.library custom ops (opaque to torch.compile, with shape-only fake versions) -----

@torch.library.custom_op("setr_kernels::upsample_bilinear_fwd", mutates_args=())
def _upsample_fwd_op(x: torch.Tensor, out_h: int, out_w: int, align_corners: bool) -> torch.Tensor:
    check_triton_op("upsample_bilinear_fwd", "kernels.upsample.upsample_bilinear", x)
    return upsample_bilinear_fwd(x, out_h, out_w, align_corners)


@_upsample_fwd_op.register_fake
def _(x, out_h, out_w, align_corners):
    return empty_in_layout((x.shape[0], x.shape[1], out_h, out_w), x, x.dtype, is_channels_last(x))


@torch.library.custom_op("setr_kernels::upsample_bilinear_bwd", mutates_args=())
def _upsample_bwd_op(dy: torch.Tensor, in_h: int, in_w: int, align_corners: bool,
                     channels_last: bool) -> torch.Tensor:
    check_triton_op("upsample_bilinear_bwd", "kernels.upsample.upsample_bilinear", dy)
    return upsample_bilinear_bwd(dy, in_h, in_w, align_corners, channels_last)


@_upsample_bwd_op.register_fake
def _(dy, in_h, in_w, align_corners, channels_last):
    return empty_in_layout((dy.shape[0], dy.shape[1], in_h, in_w), dy, dy.dtype, channels_last)



# --- autograd -----------------------------------------------------------------------------

class UpsampleBilinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, align_corners):
        ctx.in_hw = tuple(x.shape[2:])
        ctx.align_corners = align_corners
        ctx.channels_last = is_channels_last(x)
        ctx.dtype = x.dtype
        return torch.ops.setr_kernels.upsample_bilinear_fwd(x, size[0], size[1], align_corners)

    @staticmethod
    def backward(ctx, dy):
        dx = torch.ops.setr_kernels.upsample_bilinear_bwd(dy, ctx.in_hw[0], ctx.in_hw[1], ctx.align_corners,
                                                          ctx.channels_last)
        return dx.to(ctx.dtype), None, None



# --- public API ---------------------------------------------------------------------------

def upsample_bilinear(x, size, align_corners=False):
    """Bilinear resize, exactly F.interpolate(x, size=size, mode="bilinear", align_corners=...).

    x: (B, C, H, W) float32/bfloat16/float16, NCHW, channels-last or any strides; size: (out_h, out_w)
    or an int. Returns (B, C, out_h, out_w) in x.dtype and x's memory format. Backward is a
    deterministic gather with float32 accumulation.
    """
    size = _check_size("upsample_bilinear", x, size)
    check_float("upsample_bilinear: x", x)
    if not use_triton(x):
        return upsample_bilinear_reference(x, size, align_corners)
    return UpsampleBilinearFunction.apply(x, size, bool(align_corners))



# --- plain-PyTorch reference ----------------------------------------------------------------

def upsample_bilinear_reference(x, size, align_corners=False):
    """Same contract as upsample_bilinear: F.interpolate in float32 (float64 for float64 input)."""
    size = _check_size("upsample_bilinear_reference", x, size)
    compute = torch.promote_types(x.dtype, torch.float32)
    y = F.interpolate(x.to(compute), size=size, mode="bilinear", align_corners=align_corners)
    return y.to(x.dtype)
