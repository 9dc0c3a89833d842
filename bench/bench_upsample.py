"""Bilinear upsample and the fused upsample + cross-entropy loss: ours vs torch and torch.compile.

"triton" (ours) and "eager" are the model's own ops, setr.layers.upsample and setr.layers.seg_loss
with impl "triton" / "eager"; "torch.compile" compiles the eager op.

upsample_bilinear: PUP's four x2 resizes (B x 256 x {32, 64, 128, 256} -> x2), the Naive / aux
heads' x4 resizes (B x 256 x 32 -> 128, B x 256 x 128 -> 512), NCHW in bf16 and fp32, PUP's x2
resizes channels-last in bf16 ("upsample_bilinear_nhwc"). Modes fwd, bwd (of a kept forward),
fwd+bwd; GB/s counts the input read and the output written once. Peers: "eager" (F.interpolate).
upsample_cross_entropy: B x 150 x {128, 256}^2 -> 512 x 512 (Naive decode / PUP aux x4, PUP
decode x2), bf16 and fp32 logits, 10% ignored labels; time and peak_mem_mb (CUDA memory of one
call above what was allocated before). Peer "eager": F.interpolate then F.cross_entropy in float32,
as mmseg. `--setr-only`: bf16, PUP's x2 128 -> 256, the x4 128 -> 512 and both loss cases.
`--quick`: a few cases (tiny on CPU). Run through bench/kernels.py (`--only upsample`).
"""
import torch

from bench import OURS, common
from bench.common import MODES, default_device, on_gpu, time_provider
from setr.layers import seg_loss, upsample

BATCH = 8
PUP_SIZES = (32, 64, 128, 256)          # PUP decode head: 4 x [conv -> x2]
AUX_CASES = ((32, 128), (128, 512))     # Naive / aux heads: x4 resizes
LOSS_CASES = ((128, 512), (256, 512))   # fused loss: logits side -> label side
NUM_CLASSES = 150
CHANNELS = 256
IGNORE_INDEX = 255
PROVIDERS = (OURS, "eager", "torch.compile")


def make_fn(kernel, provider):
    """fn(*inputs) -> output for one provider (raises when the provider cannot run)."""
    if provider == "torch.compile":
        return common.compiled(make_fn(kernel, "eager"))
    if kernel.startswith("upsample_bilinear"):
        return lambda x, size: upsample(x, size, provider)
    return lambda logits, labels: seg_loss(logits, labels, IGNORE_INDEX, provider)


def run_upsample_case(batch, channels, hw, size, dtype, channels_last=False, quick=False):
    device = default_device()
    kernel = "upsample_bilinear_nhwc" if channels_last else "upsample_bilinear"
    x = torch.randn(batch, channels, hw, hw, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    elem = x.element_size()
    one_way = (x.numel() + batch * channels * size * size) * elem
    traffic = {"fwd": one_way, "bwd": one_way, "fwd+bwd": 2 * one_way}
    rows = []
    for provider in PROVIDERS:
        base = dict(kernel=kernel, provider=provider, shape=[batch, channels, hw, hw, size, size], dtype=str(dtype)[6:])
        rows += time_provider(lambda: make_fn(kernel, provider), (x, (size, size)), x, base, quick, bytes_moved=traffic)
    return rows


def run_loss_case(batch, classes, hw, size, dtype, quick=False):
    device = default_device()
    logits = torch.randn(batch, classes, hw, hw, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, classes, (batch, size, size), device=device)
    labels[torch.rand(batch, size, size, device=device) < 0.1] = IGNORE_INDEX
    rows = []
    for provider in PROVIDERS:
        base = dict(kernel="upsample_cross_entropy", provider=provider, shape=[batch, classes, hw, hw, size, size],
                    dtype=str(dtype)[6:])
        rows += time_provider(lambda: make_fn("upsample_cross_entropy", provider), (logits, labels), logits, base,
                              quick, memory_modes=MODES)
    return rows


def cases(quick=False, setr_only=False):
    """(kind, args) of every case: kind "upsample" (B, C, hw, size, dtype, channels_last) or
    "loss" (B, classes, hw, size, dtype)."""
    if not on_gpu():
        return [("upsample", (2, 8, 8, 16, torch.float32, False)), ("loss", (2, 19, 8, 32, torch.float32))]
    if setr_only:
        bf16 = torch.bfloat16
        return ([("upsample", (BATCH, CHANNELS, PUP_SIZES[2], 2 * PUP_SIZES[2], bf16, False)),
                 ("upsample", (BATCH, CHANNELS, *AUX_CASES[1], bf16, False))]
                + [("loss", (BATCH, NUM_CLASSES, hw, size, bf16)) for hw, size in LOSS_CASES])
    if quick:
        return [("upsample", (BATCH, CHANNELS, 64, 128, torch.bfloat16, False)),
                ("loss", (BATCH, NUM_CLASSES, 128, 512, torch.bfloat16))]
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        out += [("upsample", (BATCH, CHANNELS, hw, 2 * hw, dtype, False)) for hw in PUP_SIZES]
        out += [("upsample", (BATCH, CHANNELS, hw, size, dtype, False)) for hw, size in AUX_CASES]
    out += [("upsample", (BATCH, CHANNELS, hw, 2 * hw, torch.bfloat16, True)) for hw in PUP_SIZES]
    out += [("loss", (BATCH, NUM_CLASSES, hw, size, dtype)) for hw, size in LOSS_CASES
            for dtype in (torch.bfloat16, torch.float32)]
    return out


def run(quick=False, setr_only=False):
    """All cases; returns the result rows (bench/common.py schema)."""
    rows = []
    for kind, args in cases(quick, setr_only):
        print(kind, *args, flush=True)
        if kind == "upsample":
            b, c, hw, size, dtype, channels_last = args
            rows += run_upsample_case(b, c, hw, size, dtype, channels_last, quick=quick)
        else:
            rows += run_loss_case(*args, quick=quick)
    return rows
