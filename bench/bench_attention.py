"""Attention benchmark: our Triton kernels vs the model's eager math, each PyTorch SDPA backend,
torch.compile of the eager math, and xformers.

Every provider is timed as the ViT calls it: from the packed qkv (B, N, 3*H*D) to the (B, N, H*D)
input of the out-projection, with the layout work each one needs (splitting and merging heads, the
gradient of qkv). Modes fwd (inputs require grad), bwd (of a kept forward), fwd+bwd. TFLOP/s:
4*B*H*N^2*D forward, x2.5 backward, x3.5 fwd+bwd; peak_mem_mb: CUDA memory of one call above what
was allocated before. "triton" (ours), "eager", "sdpa_*" are setr.layers.attention_packed with that
impl (sdpa under one SDPA backend each). Shapes: SETR's (B = 1, 2, 8, 16; N = 1024, 1025, 2305,
901; H = 16; D = 64; bf16) and a sweep of N at B = 4; setr_only: ViT-L's training shapes (N = 1025,
batch 8 and 16; N = 2305, batch 8); quick: a few (a tiny one on CPU). Run through bench/kernels.py.
"""
import importlib.util

import torch

from bench import OURS, common, setr_tokens
from bench.common import MODES, default_device, on_gpu, time_provider
from kernels.utils import use_triton
from setr.layers import attention_packed

KERNEL = "attention"
SETR_BATCHES = (1, 2, 8, 16)
# with the class token at each preset's crop (ADE20K 1025, Cityscapes 2305, Pascal Context 901); and 1024
TOKENS = setr_tokens()
SETR_TOKENS = (TOKENS[0] - 1, *TOKENS)
TRAIN_SHAPES = ((8, TOKENS[0]), (16, TOKENS[0]), (8, TOKENS[1]))  # (B, N): ADE20K's crops, Cityscapes
SWEEP_BATCH = 4
SWEEP_TOKENS = (256, 512, 1024, 2048, 4096, 8192)
PEERS = ("eager", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "torch.compile", "xformers")


def sdpa_provider(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(qkv, H):
        with sdpa_kernel([backend]):
            return attention_packed(qkv, H, "sdpa")

    return run


def xformers_provider(qkv, H):
    import xformers.ops as xops

    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, H, C3 // (3 * H)).unbind(2)  # (B, N, H, D) each, xformers' layout
    return xops.memory_efficient_attention(q, k, v).reshape(B, N, C3 // 3)


def unavailable():
    """{peer: why} for the peers that cannot run on this machine (left out, said once)."""
    out = {} if importlib.util.find_spec("xformers") else {"xformers": "not installed"}
    if not on_gpu():
        out.update({p: "a CUDA-only SDPA backend" for p in ("sdpa_efficient", "sdpa_cudnn")})
    return out


def make_fn(provider):
    """fn(qkv, H) -> (B, N, H*D) for one provider (raises when it cannot run)."""
    if provider in (OURS, "eager"):
        return lambda qkv, H: attention_packed(qkv, H, provider)
    if provider.startswith("sdpa_"):
        return sdpa_provider(provider[len("sdpa_"):].upper() + "_ATTENTION")
    if provider == "torch.compile":
        return common.compiled(lambda qkv, H: attention_packed(qkv, H, "eager"))
    return xformers_provider  # the last of PEERS


def shapes(quick, setr_only=False):
    """(B, H, N, D) tuples."""
    if not on_gpu():
        return [(1, 2, 17, 32)]
    if setr_only:
        return [(B, 16, N, 64) for B, N in TRAIN_SHAPES]
    if quick:
        return [(2, 16, N, 64) for N in SETR_TOKENS[:3]] + [(SWEEP_BATCH, 16, 4096, 64)]
    return ([(B, 16, N, 64) for B in SETR_BATCHES for N in SETR_TOKENS]
            + [(SWEEP_BATCH, 16, N, 64) for N in SWEEP_TOKENS])


def bench_provider(name, B, H, N, D, dtype, quick):
    """Rows for the three modes of one provider at one shape (error rows when it cannot run)."""
    device = default_device()
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, N, H * D, device=device, dtype=dtype)
    fwd_flops = 4.0 * B * H * N * N * D
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
    base = {"kernel": KERNEL, "provider": name, "shape": f"B={B} H={H} N={N} D={D}", "dtype": str(dtype)[6:],
            "B": B, "H": H, "N": N, "D": D}
    if name == OURS:
        base["path"] = ("triton" if on_gpu() else "triton-interpreter") if use_triton(qkv) else "reference"
    rows = time_provider(lambda: make_fn(name), (qkv, H), qkv, base, quick, grads=[dout], flops=flops,
                         memory_modes=MODES)
    if on_gpu():
        torch.cuda.empty_cache()
    return rows


def run(quick=False, setr_only=False):
    dtype = torch.bfloat16
    rows, skip = [], unavailable()
    for B, H, N, D in shapes(quick, setr_only):
        for name in [p for p in (OURS,) + PEERS if p not in skip]:
            for row in bench_provider(name, B, H, N, D, dtype, quick):
                rows.append(row)
                shown = row.get("error") or f"{row['ms']:.3f} ms  {row['tflops']:.1f} TFLOP/s"
                print(f"{row['shape']:<26} {row['mode']:<8} {name:<15} {shown}", flush=True)
    return rows
