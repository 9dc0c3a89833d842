"""Bilinear upsampling (F.interpolate semantics) and the fused upsample + cross-entropy loss.

    upsample_bilinear(x, size):  y[b, c, oy, ox] = bilinear mix of the 4 source pixels of (oy, ox)
    upsample_cross_entropy(logits, labels):  CE(upsample_bilinear(logits, labels.shape[-2:]), labels),
                                             never storing the upsampled logits or their gradient

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

Fused loss (SETR's heads compute logits at low resolution: the 1x1 classifier commutes with the
final upsample). Forward: each program owns a tile of label pixels, interpolates all C logits of
each pixel chunk by chunk with an online log-sum-exp (log2 units), writes the per-pixel LSE
(float32, B*H*W*4 bytes) and one partial loss sum, and the partials are summed in a fixed order.
Backward: d loss / d upsampled logit = (softmax - onehot) * scale; the gradient of the low-res
logits is its bilinear transpose, computed as a gather like the upsample backward. Each program
owns a tile of low-res pixels x BLOCK_C classes; for each label row of the footprint window it
loads the row's two source rows at columns ix-1, ix, ix+1 (every label pixel whose footprint
holds (iy, ix) interpolates from those; they sit in L1/L2) and interpolates along y, then for
each label column finishes the upsampled logit and exp2(z - lse) in registers. Recomputing is
far cheaper than storing 150 x 512 x 512 floats and reading them back; no atomics, so the
gradient is bitwise reproducible.

Dispatch (kernels/utils.py): CUDA tensors run the compiled kernels, CPU tensors run them through
the Triton interpreter when TRITON_INTERPRET=1 and the plain-PyTorch references otherwise. The
kernels sit behind torch.library custom ops (namespace "setr_kernels") with fake versions, called
from the autograd Functions, so torch.compile traces through without graph breaks.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.utils import INTERPRET, check_float, check_triton_op, device_guard, use_triton

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Elements (channels x pixels) per program of the upsample kernels. The interpreter pays per
# program and per op, not per element, so it gets the largest tiles (the kernels are the same).
FWD_TILE = 1 << 16 if INTERPRET else 2048
BWD_TILE = 1 << 16 if INTERPRET else 1024
# Fused loss: (classes per chunk, pixels per program); the backward keeps 9 such tiles live.
CE_FWD_BLOCK = (256, 256) if INTERPRET else (16, 128)
CE_BWD_BLOCK = (256, 256) if INTERPRET else (16, 128)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "mean_valid", "sum")


# --- Triton kernels -----------------------------------------------------------------------

@triton.jit
def _pixel_tile(tile, n_rows, n_cols, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
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


@triton.jit
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
    oy, ox, mask_p = _pixel_tile(tile, OH, OW, BLOCK_H, BLOCK_W)
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

    # interpolate along x, then along y; write back in the output dtype
    top = a + lx[None, :] * (bb - a)
    bot = cc + lx[None, :] * (d - cc)
    y = top + ly[None, :] * (bot - top)
    out = Y + b * syb + c[:, None] * syc + (oy.to(tl.int64) * syh + ox * syw)[None, :]
    tl.store(out, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
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
    iy, ix, mask_p = _pixel_tile(tile, H, W, BLOCK_H, BLOCK_W)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = c < C
    ys = tl.load(YS + iy, mask=mask_p, other=0)
    xs = tl.load(XS + ix, mask=mask_p, other=0)
    dy_base = DY + b * sdb + c[:, None] * sdc
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)

    for k in range(WIN_X):
        # output column k of each input pixel's window, and its weight onto the input column
        ox = xs + k
        oxc = tl.minimum(ox, OW - 1)
        x0 = tl.load(X0 + oxc)
        lx = tl.load(LX + oxc)
        x1 = tl.minimum(x0 + 1, W - 1)
        wx = tl.where(x0 == ix, 1.0 - lx, 0.0) + tl.where(x1 == ix, lx, 0.0)
        wx = tl.where(mask_p & (ox < OW), wx, 0.0)
        for j in range(WIN_Y):
            # output row j of the window, and its weight onto the input row
            oy = ys + j
            oyc = tl.minimum(oy, OH - 1)
            y0 = tl.load(Y0 + oyc)
            ly = tl.load(LY + oyc)
            y1 = tl.minimum(y0 + 1, H - 1)
            wy = tl.where(y0 == iy, 1.0 - ly, 0.0) + tl.where(y1 == iy, ly, 0.0)
            wy = tl.where(oy < OH, wy, 0.0)
            # gather dy where the weight is non-zero, accumulate in float32
            wgt = wx * wy
            m = mask_c[:, None] & (wgt != 0.0)[None, :]
            g = tl.load(dy_base + (oyc.to(tl.int64) * sdh + oxc * sdw)[None, :], mask=m, other=0.0)
            acc += g.to(tl.float32) * wgt[None, :]

    out = DX + b * sxb + c[:, None] * sxc + (iy.to(tl.int64) * sxh + ix * sxw)[None, :]
    tl.store(out, acc.to(DX.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _upsample_ce_fwd_kernel(
    Z,          # (B, C, h, w) low-res logits, strides (szb, szc, szh, szw)
    LABELS,     # (B, H, W) contiguous integer labels
    LSE,        # (B, H, W) out: float32 log2(sum_c exp2(z2_c)) of the upsampled logits, z2 = z * log2(e)
    LOSS,       # (num_programs,) out: float32 sum of this program's per-pixel losses
    COUNT,      # (num_programs, 2) out: int32 (valid pixels, bad labels) of this program
    Y0, LY,     # (H,) row tables (h -> H)
    X0, LX,     # (W,) column tables (w -> W)
    C, h, w, H, W, ignore_index,
    szb, szc, szh, szw,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # program -> (batch, tile of label pixels)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_H) * tl.cdiv(W, BLOCK_W)
    tile = pid % n_tiles
    b = (pid // n_tiles).to(tl.int64)
    oy, ox, mask_p = _pixel_tile(tile, H, W, BLOCK_H, BLOCK_W)

    # labels: ignored, valid, or bad (outside [0, C) and not ignored: counted, the host raises)
    pix = (b * H + oy) * W + ox
    lab = tl.load(LABELS + pix, mask=mask_p, other=0).to(tl.int64)
    labelled = mask_p & (lab != ignore_index)
    bad = labelled & ((lab < 0) | (lab >= C))
    valid = labelled & ~bad
    target = tl.where(valid, lab, -1).to(tl.int32)

    # source rows/columns and weights of every pixel
    y0 = tl.load(Y0 + oy, mask=mask_p, other=0)
    ly = tl.load(LY + oy, mask=mask_p, other=0.0)
    y1 = tl.minimum(y0 + 1, h - 1)
    x0 = tl.load(X0 + ox, mask=mask_p, other=0)
    lx = tl.load(LX + ox, mask=mask_p, other=0.0)
    x1 = tl.minimum(x0 + 1, w - 1)
    r0 = y0 * szh  # offsets inside one image fit in int32 (checked on the host)
    r1 = y1 * szh
    off_a = (r0 + x0 * szw)[:, None]
    off_b = (r0 + x1 * szw)[:, None]
    off_c = (r1 + x0 * szw)[:, None]
    off_d = (r1 + x1 * szw)[:, None]
    zb = Z + b * szb

    # online log-sum-exp over class chunks, in log2 units; pick the target's logit on the way
    m = tl.full((BLOCK_H * BLOCK_W,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_H * BLOCK_W,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_H * BLOCK_W,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask_c = c < C
        mask = mask_c[None, :] & mask_p[:, None]
        zc = zb + c[None, :] * szc
        # interpolate this chunk's logits from the 4 source pixels (float32), scale to log2 units
        a = tl.load(zc + off_a, mask=mask, other=0.0).to(tl.float32)
        bb = tl.load(zc + off_b, mask=mask, other=0.0).to(tl.float32)
        cc = tl.load(zc + off_c, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(zc + off_d, mask=mask, other=0.0).to(tl.float32)
        top = a + lx[:, None] * (bb - a)
        bot = cc + lx[:, None] * (d - cc)
        z = (top + ly[:, None] * (bot - top)) * LOG2E
        z = tl.where(mask_c[None, :], z, float("-inf"))
        # rescale the running sum to the new maximum and add this chunk
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        m = m_new
        z_target += tl.sum(tl.where(c[None, :] == target[:, None], z, 0.0), axis=1)

    # per-pixel loss = ln(2) * (lse2 - z2_target); save lse2 for the backward; one partial per program
    lse = m + tl.log2(s)
    tl.store(LSE + pix, lse, mask=mask_p)
    loss = tl.where(valid, (lse - z_target) * LN2, 0.0)
    tl.store(LOSS + pid, tl.sum(loss, axis=0))
    tl.store(COUNT + 2 * pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(COUNT + 2 * pid + 1, tl.sum(bad.to(tl.int32), axis=0))


@triton.jit
def _upsample_ce_bwd_kernel(
    Z,          # (B, C, h, w) low-res logits, strides (szb, szc, szh, szw)
    LABELS,     # (B, H, W) contiguous integer labels (validated by the forward)
    LSE,        # (B, H, W) float32 log2-sum-exp2 saved by the forward
    SCALE,      # (1,) float32: d loss / d per-pixel loss (grad_output / denominator)
    DZ,         # (B, C, h, w) out: gradient of the logits, strides (sdb, sdc, sdh, sdw)
    Y0, LY,     # (H,) row tables (h -> H)
    X0, LX,     # (W,) column tables (w -> W)
    YS,         # (h,) int32 first label row whose footprint holds each logit row
    XS,         # (w,) int32 first label column whose footprint holds each logit column
    C, h, w, H, W, ignore_index,
    szb, szc, szh, szw, sdb, sdc, sdh, sdw,
    WIN_Y: tl.constexpr,
    WIN_X: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # program -> (batch, tile of logit pixels, class block); class blocks vary fastest, so the
    # programs reading the same labels and LSE run side by side
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    n_tiles = tl.cdiv(h, BLOCK_H) * tl.cdiv(w, BLOCK_W)
    cb = pid % n_cb
    tile = (pid // n_cb) % n_tiles
    b = (pid // (n_cb * n_tiles)).to(tl.int64)
    iy, ix, mask_p = _pixel_tile(tile, h, w, BLOCK_H, BLOCK_W)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    mask = mask_c[None, :] & mask_p[:, None]

    # every label pixel whose footprint holds (iy, ix) interpolates from columns ix-1..ix+1
    # (addresses = one scalar base + int32 offsets, so no tile of 64-bit pointers stays live)
    zb = Z + b * szb
    coff = (c * szc)[None, :]  # offsets inside one image fit in int32 (checked on the host)
    c_m = (tl.maximum(ix - 1, 0) * szw)[:, None]
    c_0 = (ix * szw)[:, None]
    c_p = (tl.minimum(ix + 1, w - 1) * szw)[:, None]
    ys = tl.load(YS + iy, mask=mask_p, other=0)
    xs = tl.load(XS + ix, mask=mask_p, other=0)
    pix_base = b * H * W
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
    for j in range(WIN_Y):
        # label row j of each pixel's window: its weight onto iy, and its two source rows
        oy = ys + j
        oyc = tl.minimum(oy, H - 1)
        y0 = tl.load(Y0 + oyc)
        ly = tl.load(LY + oyc)
        y1 = tl.minimum(y0 + 1, h - 1)
        wy = tl.where(y0 == iy, 1.0 - ly, 0.0) + tl.where(y1 == iy, ly, 0.0)
        wy = tl.where(mask_p & (oy < H), wy, 0.0)
        # load the source rows at columns ix-1, ix, ix+1 (L1-resident) and interpolate along y,
        # in log2 units; rows of zero weight are skipped
        lm = mask & (wy != 0.0)[:, None]
        r0 = (y0 * szh)[:, None]
        r1 = (y1 * szh)[:, None]
        ly2 = ly[:, None]
        t = tl.load(zb + ((r0 + c_m) + coff), mask=lm, other=0.0).to(tl.float32)
        v_m = (t + ly2 * (tl.load(zb + ((r1 + c_m) + coff), mask=lm, other=0.0).to(tl.float32) - t)) * LOG2E
        t = tl.load(zb + ((r0 + c_0) + coff), mask=lm, other=0.0).to(tl.float32)
        v_0 = (t + ly2 * (tl.load(zb + ((r1 + c_0) + coff), mask=lm, other=0.0).to(tl.float32) - t)) * LOG2E
        t = tl.load(zb + ((r0 + c_p) + coff), mask=lm, other=0.0).to(tl.float32)
        v_p = (t + ly2 * (tl.load(zb + ((r1 + c_p) + coff), mask=lm, other=0.0).to(tl.float32) - t)) * LOG2E
        d_m = v_0 - v_m  # slopes along x: z = v_m + lx * d_m, or v_0 + lx * d_p
        d_p = v_p - v_0
        for k in range(WIN_X):
            # label column k of the window: its weight onto ix, and its two source columns
            ox = xs + k
            oxc = tl.minimum(ox, W - 1)
            x0 = tl.load(X0 + oxc)
            lx = tl.load(LX + oxc)
            x1 = tl.minimum(x0 + 1, w - 1)
            wx = tl.where(x0 == ix, 1.0 - lx, 0.0) + tl.where(x1 == ix, lx, 0.0)
            wpix = tl.where(ox < W, wx * wy, 0.0)
            # the upsampled logit of label pixel (oy, ox) for this program's classes
            left = (x0 < ix)[:, None]  # sources (ix-1, ix), else (ix, ix+1)
            z = tl.where(left, v_m, v_0) + lx[:, None] * tl.where(left, d_m, d_p)
            pix = pix_base + oyc * W + oxc
            lab = tl.load(LABELS + pix).to(tl.int32)
            lse = tl.load(LSE + pix)
            valid = (lab != ignore_index) & (wpix != 0.0)
            # d loss / d z = softmax - onehot, weighted onto (iy, ix); pixels outside the footprint masked
            p = tl.exp2(z - lse[:, None])
            g = tl.where((lab - cb * BLOCK_C)[:, None] == tl.arange(0, BLOCK_C)[None, :], p - 1.0, p)
            acc += tl.where(valid[:, None], g, 0.0) * wpix[:, None]

    scale = tl.load(SCALE)
    out = DZ + b * sdb + c.to(tl.int64)[None, :] * sdc + (iy.to(tl.int64) * sdh + ix * sdw)[:, None]
    tl.store(out, (acc * scale).to(DZ.dtype.element_ty), mask=mask)


# --- index tables and launchers -------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _axis_tables(n_in, n_out, align_corners, device):
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


def _channels_last(x):
    """True when x is laid out channels-last (and not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _empty(shape, like, dtype, channels_last):
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


def _ce_tile(c, rows, cols, block):
    """(BLOCK_C, BLOCK_H, BLOCK_W) of a fused-loss kernel from (classes, pixels) per program."""
    p2 = triton.next_power_of_2
    block_c, pixels = block
    block_w = min(p2(cols), pixels)
    return min(block_c, p2(c)), min(p2(rows), max(1, pixels // block_w)), block_w


def upsample_bilinear_fwd(x, out_h, out_w, align_corners):
    """x: (B, C, H, W) -> y: (B, C, out_h, out_w) in x.dtype and x's memory format."""
    B, C, H, W = x.shape
    cl = _channels_last(x)
    y = _empty((B, C, out_h, out_w), x, x.dtype, cl)
    if y.numel() == 0:
        return y
    y0, ly, _, _ = _axis_tables(H, out_h, align_corners, x.device)
    x0, lx, _, _ = _axis_tables(W, out_w, align_corners, x.device)
    block_c, block_h, block_w, num_warps = _tile(C, out_h, out_w, cl, FWD_TILE)
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
    dx = _empty((B, C, in_h, in_w), dy, dy.dtype, channels_last)
    if dx.numel() == 0:
        return dx
    y0, ly, ys, win_y = _axis_tables(in_h, OH, align_corners, dy.device)
    x0, lx, xs, win_x = _axis_tables(in_w, OW, align_corners, dy.device)
    block_c, block_h, block_w, num_warps = _tile(C, in_h, in_w, channels_last, BWD_TILE)
    tiles = triton.cdiv(in_h, block_h) * triton.cdiv(in_w, block_w)
    with device_guard(dy):
        _upsample_bwd_kernel[(B * triton.cdiv(C, block_c) * tiles,)](
            dy, dx, y0, ly, x0, lx, ys, xs,
            C, in_h, in_w, OH, OW,
            *dy.stride(), *dx.stride(),
            WIN_Y=win_y, WIN_X=win_x, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
        )
    return dx


def upsample_cross_entropy_fwd(logits, labels, ignore_index, align_corners):
    """logits: (B, C, h, w); labels: (B, H, W) integer.

    Returns (loss_sum, n_valid, lse): float32 () sum of the per-pixel losses over valid pixels,
    int64 () number of valid pixels, float32 (B, H, W) log2-sum-exp2 of the upsampled logits.
    Raises ValueError when a label is neither in [0, C) nor ignore_index.
    """
    B, C, h, w = logits.shape
    _, H, W = labels.shape
    _check_image_span("upsample_cross_entropy", logits)
    labels = labels.contiguous()
    lse = torch.empty((B, H, W), dtype=torch.float32, device=logits.device)
    y0, ly, _, _ = _axis_tables(h, H, align_corners, logits.device)
    x0, lx, _, _ = _axis_tables(w, W, align_corners, logits.device)
    block_c, block_h, block_w = _ce_tile(C, H, W, CE_FWD_BLOCK)
    programs = B * triton.cdiv(H, block_h) * triton.cdiv(W, block_w)
    loss_partial = torch.empty(programs, dtype=torch.float32, device=logits.device)
    count_partial = torch.empty((programs, 2), dtype=torch.int32, device=logits.device)
    with device_guard(logits):
        _upsample_ce_fwd_kernel[(programs,)](
            logits, labels, lse, loss_partial, count_partial,
            y0, ly, x0, lx,
            C, h, w, H, W, ignore_index,
            *logits.stride(),
            BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
        )
    # second stage: fixed-order sums of the per-program partials (deterministic)
    counts = count_partial.sum(dim=0, dtype=torch.int64)
    if counts[1].item() > 0:  # one tiny device-to-host copy: the price of a clear error
        check_labels("upsample_cross_entropy", labels, C, ignore_index)
    return loss_partial.sum(), counts[0], lse


def upsample_cross_entropy_bwd(logits, labels, lse, scale, ignore_index, align_corners):
    """logits: (B, C, h, w); labels, lse: (B, H, W); scale: float32 () = grad_output / denominator.

    Returns dlogits (B, C, h, w) in logits.dtype and memory format.
    """
    B, C, h, w = logits.shape
    _, H, W = labels.shape
    _check_image_span("upsample_cross_entropy", logits)
    labels, lse = labels.contiguous(), lse.contiguous()
    scale = scale.to(torch.float32).reshape(1)
    dz = _empty(logits.shape, logits, logits.dtype, _channels_last(logits))
    y0, ly, ys, win_y = _axis_tables(h, H, align_corners, logits.device)
    x0, lx, xs, win_x = _axis_tables(w, W, align_corners, logits.device)
    block_c, block_h, block_w = _ce_tile(C, h, w, CE_BWD_BLOCK)
    grid = (B * triton.cdiv(h, block_h) * triton.cdiv(w, block_w) * triton.cdiv(C, block_c),)
    with device_guard(logits):
        _upsample_ce_bwd_kernel[grid](
            logits, labels, lse, scale, dz,
            y0, ly, x0, lx, ys, xs,
            C, h, w, H, W, ignore_index,
            *logits.stride(), *dz.stride(),
            WIN_Y=win_y, WIN_X=win_x, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
        )
    return dz


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


def _check_image_span(name, t):
    """The fused-loss kernels address inside one image with int32 offsets: check they fit."""
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
    if span >= 2**31:
        raise ValueError(f"{name}: one image of logits spans {span + 1} elements (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}); at most 2**31 are supported")


def check_labels(name, labels, num_classes, ignore_index):
    """Raise ValueError naming the first label outside [0, num_classes) that is not ignore_index."""
    lab = labels.long()
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    n_bad = int(bad.sum())
    if n_bad:
        first = int(lab[bad][0])
        raise ValueError(f"{name}: labels hold {n_bad} value(s) outside [0, {num_classes}) that are not "
                         f"ignore_index={ignore_index}; the first is {first}")


def _check_loss_inputs(name, logits, labels, reduction):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name}: logits must be 4-D (B, C, h, w), got {shape}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name}: logits dtype {logits.dtype} is not a floating-point dtype")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name}: labels must be 3-D (B, H, W), got {shape}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name}: labels dtype {labels.dtype} is not supported; expected an integer dtype "
                        "(int64, int32, int16, int8, uint8)")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: labels have batch size {labels.shape[0]}, expected logits' batch size "
                         f"{logits.shape[0]}")
    if labels.device != logits.device:
        raise ValueError(f"{name}: labels are on {labels.device}, expected logits' device {logits.device}")
    if min(logits.shape) < 1 or min(labels.shape) < 1:
        raise ValueError(f"{name}: empty input: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction {reduction!r} is not supported; expected one of {REDUCTIONS}")


# --- torch.library custom ops (opaque to torch.compile, with shape-only fake versions) -----

@torch.library.custom_op("setr_kernels::upsample_bilinear_fwd", mutates_args=())
def _upsample_fwd_op(x: torch.Tensor, out_h: int, out_w: int, align_corners: bool) -> torch.Tensor:
    check_triton_op("upsample_bilinear_fwd", "kernels.upsample.upsample_bilinear", x)
    return upsample_bilinear_fwd(x, out_h, out_w, align_corners)


@_upsample_fwd_op.register_fake
def _(x, out_h, out_w, align_corners):
    return _empty((x.shape[0], x.shape[1], out_h, out_w), x, x.dtype, _channels_last(x))


@torch.library.custom_op("setr_kernels::upsample_bilinear_bwd", mutates_args=())
def _upsample_bwd_op(dy: torch.Tensor, in_h: int, in_w: int, align_corners: bool,
                     channels_last: bool) -> torch.Tensor:
    check_triton_op("upsample_bilinear_bwd", "kernels.upsample.upsample_bilinear", dy)
    return upsample_bilinear_bwd(dy, in_h, in_w, align_corners, channels_last)


@_upsample_bwd_op.register_fake
def _(dy, in_h, in_w, align_corners, channels_last):
    return _empty((dy.shape[0], dy.shape[1], in_h, in_w), dy, dy.dtype, channels_last)


@torch.library.custom_op("setr_kernels::upsample_cross_entropy_fwd", mutates_args=())
def _upsample_ce_fwd_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_op("upsample_cross_entropy_fwd", "kernels.upsample.upsample_cross_entropy", logits, labels)
    return upsample_cross_entropy_fwd(logits, labels, ignore_index, align_corners)


@_upsample_ce_fwd_op.register_fake
def _(logits, labels, ignore_index, align_corners):
    loss = logits.new_empty((), dtype=torch.float32)
    n_valid = logits.new_empty((), dtype=torch.int64)
    return loss, n_valid, logits.new_empty(labels.shape, dtype=torch.float32)


@torch.library.custom_op("setr_kernels::upsample_cross_entropy_bwd", mutates_args=())
def _upsample_ce_bwd_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int, align_corners: bool) -> torch.Tensor:
    check_triton_op("upsample_cross_entropy_bwd", "kernels.upsample.upsample_cross_entropy", logits, labels,
                    lse, scale)
    return upsample_cross_entropy_bwd(logits, labels, lse, scale, ignore_index, align_corners)


@_upsample_ce_bwd_op.register_fake
def _(logits, labels, lse, scale, ignore_index, align_corners):
    return _empty(logits.shape, logits, logits.dtype, _channels_last(logits))


# --- autograd -----------------------------------------------------------------------------

class UpsampleBilinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, align_corners):
        ctx.in_hw = tuple(x.shape[2:])
        ctx.align_corners = align_corners
        ctx.channels_last = _channels_last(x)
        ctx.dtype = x.dtype
        return torch.ops.setr_kernels.upsample_bilinear_fwd(x, size[0], size[1], align_corners)

    @staticmethod
    def backward(ctx, dy):
        dx = torch.ops.setr_kernels.upsample_bilinear_bwd(dy, ctx.in_hw[0], ctx.in_hw[1], ctx.align_corners,
                                                          ctx.channels_last)
        return dx.to(ctx.dtype), None, None


class UpsampleCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, align_corners, reduction):
        loss_sum, n_valid, lse = torch.ops.setr_kernels.upsample_cross_entropy_fwd(
            logits, labels, ignore_index, align_corners)
        if reduction == "mean":
            denom = loss_sum.new_full((), float(labels.numel()))
        elif reduction == "mean_valid":
            denom = n_valid.clamp_min(1).to(torch.float32)
        else:
            denom = loss_sum.new_ones(())
        ctx.save_for_backward(logits, labels, lse, denom)
        ctx.ignore_index = ignore_index
        ctx.align_corners = align_corners
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse, denom = ctx.saved_tensors
        scale = grad.to(torch.float32) / denom
        dlogits = torch.ops.setr_kernels.upsample_cross_entropy_bwd(
            logits, labels, lse, scale, ctx.ignore_index, ctx.align_corners)
        return dlogits, None, None, None, None


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


def upsample_cross_entropy(logits, labels, ignore_index=255, align_corners=False, reduction="mean"):
    """Cross-entropy of the logits bilinearly resized to the labels' size, never storing them.

    logits: (B, C, h, w) any float dtype (math in float32); labels: (B, H, W) integer (int64, int32,
    uint8, ...), values in [0, C) or ignore_index. reduction: "mean" = sum over non-ignored pixels /
    (B*H*W) (mmseg's default), "mean_valid" = / number of non-ignored pixels (0 when there are none),
    "sum". Returns a float32 () tensor; the gradient of logits comes back in logits.dtype.
    """
    _check_loss_inputs("upsample_cross_entropy", logits, labels, reduction)
    if not use_triton(logits, labels):
        return upsample_cross_entropy_reference(logits, labels, ignore_index, align_corners, reduction)
    return UpsampleCrossEntropyFunction.apply(logits, labels, int(ignore_index), bool(align_corners), reduction)


# --- plain-PyTorch references ---------------------------------------------------------------

def upsample_bilinear_reference(x, size, align_corners=False):
    """Same contract as upsample_bilinear: F.interpolate in float32 (float64 for float64 input)."""
    size = _check_size("upsample_bilinear_reference", x, size)
    compute = torch.promote_types(x.dtype, torch.float32)
    y = F.interpolate(x.to(compute), size=size, mode="bilinear", align_corners=align_corners)
    return y.to(x.dtype)


def upsample_cross_entropy_reference(logits, labels, ignore_index=255, align_corners=False, reduction="mean"):
    """Same contract as upsample_cross_entropy: F.interpolate + F.cross_entropy(reduction="none") in
    float32 (float64 for float64 logits), reduced as `reduction` says."""
    name = "upsample_cross_entropy_reference"
    _check_loss_inputs(name, logits, labels, reduction)
    check_labels(name, labels, logits.shape[1], ignore_index)
    compute = torch.promote_types(logits.dtype, torch.float32)
    z = F.interpolate(logits.to(compute), size=tuple(labels.shape[1:]), mode="bilinear", align_corners=align_corners)
    loss = F.cross_entropy(z, labels.long(), ignore_index=ignore_index, reduction="none").sum()
    if reduction == "mean":
        return loss / labels.numel()
    if reduction == "mean_valid":
        return loss / (labels != ignore_index).sum().clamp_min(1)
    return loss
