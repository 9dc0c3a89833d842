"""Fused bilinear upsample + cross-entropy: the loss of logits resized to the labels' size,
never storing the upsampled logits or their gradient.

    upsample_cross_entropy(logits, labels):  CE(upsample_bilinear(logits, labels.shape[-2:]), labels)

SETR's heads compute logits at low resolution: the 1x1 classifier commutes with the final
upsample. Source indices and weights come from kernels.upsample's per-axis tables and every
upsampled logit is blended by the same 4-tap helper, so it equals upsample_bilinear's.

Forward: each program owns a tile of label pixels, interpolates all C logits of each pixel chunk
by chunk with an online log-sum-exp (log2 units), writes the per-pixel LSE (float32, B*H*W*4
bytes) and one partial loss sum, and the partials are summed in a fixed order.
Backward: d loss / d upsampled logit = (softmax - onehot) * scale; the gradient of the low-res
logits is its bilinear transpose, computed as a gather like the upsample backward. Each program
owns a tile of low-res pixels x BLOCK_C classes; for each label row of the footprint window it
loads the row's two source rows at columns ix-1, ix, ix+1 (every label pixel whose footprint
holds (iy, ix) interpolates from those; they sit in L1/L2) and interpolates along y, then for
each label column finishes the upsampled logit and exp2(z - lse) in registers. Recomputing is
far cheaper than storing 150 x 512 x 512 floats and reading them back; no atomics, so the
gradient is bitwise reproducible.

Labels neither in [0, C) nor ignore_index are counted by the forward kernel and checked on the
device with torch._assert_async (as F.cross_entropy checks its targets on CUDA), so the loss
never waits for the GPU; on CPU the check raises at once, a ValueError naming the first bad label.

Dispatch (kernels/utils.py): CUDA tensors run the compiled kernels, CPU tensors run them through
the Triton interpreter when TRITON_INTERPRET=1 and the plain-PyTorch reference otherwise. The
kernels sit behind torch.library custom ops (namespace "setr_kernels") with fake versions, called
from the autograd Function, so torch.compile traces through without graph breaks.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.upsample import axis_tables, blend4, empty_in_layout, is_channels_last, pixel_tile, window_tap
from kernels.utils import check_triton_op, device_guard, jit, launch_mode, use_triton

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# (classes per chunk, pixels per program) by launch_mode; the backward keeps 9 such tiles live. The
# interpreter pays per program and per op, not per element, so it gets the largest tiles (same kernels).
CE_FWD_BLOCK = {"compiled": (16, 128), "interpreted": (256, 256)}
CE_BWD_BLOCK = {"compiled": (16, 128), "interpreted": (256, 256)}
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "mean_valid", "sum")


# --- Triton kernels -----------------------------------------------------------------------

@jit
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
    oy, ox, mask_p = pixel_tile(tile, H, W, BLOCK_H, BLOCK_W)

    # labels: ignored, valid, or bad (outside [0, C) and not ignored: counted, checked on the device)
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
        z = blend4(a, bb, cc, d, lx[:, None], ly[:, None]) * LOG2E
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


@jit
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
    iy, ix, mask_p = pixel_tile(tile, h, w, BLOCK_H, BLOCK_W)
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
        oyc, y0, ly, wy = window_tap(ys, j, iy, H, h, Y0, LY)
        y1 = tl.minimum(y0 + 1, h - 1)
        wy = tl.where(mask_p, wy, 0.0)
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
            oxc, x0, lx, wx = window_tap(xs, k, ix, W, w, X0, LX)
            wpix = wx * wy
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



# --- launchers ---------------------------------------------------------------------------

def _ce_tile(c, rows, cols, block):
    """(BLOCK_C, BLOCK_H, BLOCK_W) of a fused-loss kernel from (classes, pixels) per program."""
    p2 = triton.next_power_of_2
    block_c, pixels = block
    block_w = min(p2(cols), pixels)
    return min(block_c, p2(c)), min(p2(rows), max(1, pixels // block_w)), block_w


def upsample_cross_entropy_fwd(logits, labels, ignore_index, align_corners):
    """logits: (B, C, h, w); labels: (B, H, W) integer.

    Returns (loss_sum, n_valid, n_bad, lse): float32 () sum of the per-pixel losses over valid
    pixels, int64 () numbers of valid pixels and of bad labels (neither in [0, C) nor ignore_index),
    float32 (B, H, W) log2-sum-exp2 of the upsampled logits. Nothing here waits for the device.
    """
    B, C, h, w = logits.shape
    _, H, W = labels.shape
    _check_image_span("upsample_cross_entropy", logits)
    labels = labels.contiguous()
    lse = torch.empty((B, H, W), dtype=torch.float32, device=logits.device)
    y0, ly, _, _ = axis_tables(h, H, align_corners, logits.device)
    x0, lx, _, _ = axis_tables(w, W, align_corners, logits.device)
    block_c, block_h, block_w = _ce_tile(C, H, W, CE_FWD_BLOCK[launch_mode(logits)])
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
    return loss_partial.sum(), counts[0], counts[1], lse


def upsample_cross_entropy_bwd(logits, labels, lse, scale, ignore_index, align_corners):
    """logits: (B, C, h, w); labels, lse: (B, H, W); scale: float32 () = grad_output / denominator.

    Returns dlogits (B, C, h, w) in logits.dtype and memory format.
    """
    B, C, h, w = logits.shape
    _, H, W = labels.shape
    _check_image_span("upsample_cross_entropy", logits)
    labels, lse = labels.contiguous(), lse.contiguous()
    scale = scale.to(torch.float32).reshape(1)
    dz = empty_in_layout(logits.shape, logits, logits.dtype, is_channels_last(logits))
    y0, ly, ys, win_y = axis_tables(h, H, align_corners, logits.device)
    x0, lx, xs, win_x = axis_tables(w, W, align_corners, logits.device)
    block_c, block_h, block_w = _ce_tile(C, h, w, CE_BWD_BLOCK[launch_mode(logits)])
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

def _check_image_span(name, t):
    """The fused-loss kernels address inside one image with int32 offsets: check they fit."""
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
    if span >= 2**31:
        raise ValueError(f"{name}: one image of logits spans {span + 1} elements (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}); at most 2**31 are supported")


def check_labels(name, labels, num_classes, ignore_index, n_bad=None):
    """Check that no label is outside [0, num_classes) and not ignore_index, without a host sync.

    n_bad: the number of bad labels when already counted (int64 () tensor), else counted here.
    The check runs on the device (torch._assert_async): on CUDA a bad label is a device-side
    assert, as in F.cross_entropy; on CPU it raises at once, a ValueError naming the first one.
    """
    lab = labels.long()
    bad = lambda: (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if n_bad is None:
        n_bad = bad().sum()
    try:
        torch._assert_async(n_bad == 0, f"{name}: labels hold values outside [0, {num_classes}) that are not "
                                        f"ignore_index={ignore_index}")
    except RuntimeError:
        if not int(n_bad):
            raise  # not the label check
        raise ValueError(f"{name}: labels hold {int(n_bad)} value(s) outside [0, {num_classes}) that are not "
                         f"ignore_index={ignore_index}; the first is {int(lab[bad()][0])}") from None


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

@torch.library.custom_op("setr_kernels::upsample_cross_entropy_fwd", mutates_args=())
def _upsample_ce_fwd_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_op("upsample_cross_entropy_fwd", "kernels.upsample_cross_entropy.upsample_cross_entropy",
                    logits, labels)
    loss_sum, n_valid, n_bad, lse = upsample_cross_entropy_fwd(logits, labels, ignore_index, align_corners)
    check_labels("upsample_cross_entropy", labels, logits.shape[1], ignore_index, n_bad)
    return loss_sum, n_valid, lse


@_upsample_ce_fwd_op.register_fake
def _(logits, labels, ignore_index, align_corners):
    loss = logits.new_empty((), dtype=torch.float32)
    n_valid = logits.new_empty((), dtype=torch.int64)
    return loss, n_valid, logits.new_empty(labels.shape, dtype=torch.float32)


@torch.library.custom_op("setr_kernels::upsample_cross_entropy_bwd", mutates_args=())
def _upsample_ce_bwd_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int, align_corners: bool) -> torch.Tensor:
    check_triton_op("upsample_cross_entropy_bwd", "kernels.upsample_cross_entropy.upsample_cross_entropy",
                    logits, labels, lse, scale)
    return upsample_cross_entropy_bwd(logits, labels, lse, scale, ignore_index, align_corners)


@_upsample_ce_bwd_op.register_fake
def _(logits, labels, lse, scale, ignore_index, align_corners):
    return empty_in_layout(logits.shape, logits, logits.dtype, is_channels_last(logits))



# --- autograd -----------------------------------------------------------------------------

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



# --- plain-PyTorch reference ----------------------------------------------------------------

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
