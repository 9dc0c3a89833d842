"""Launch helpers shared by every kernel family.

Dispatch rule: CUDA tensors run the compiled Triton kernel; CPU tensors run
the same kernel through Triton's interpreter when TRITON_INTERPRET=1 (the tests), and the
plain-PyTorch reference otherwise.
"""
import contextlib
import os

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_PLAN_AS_CUDA = False


@contextlib.contextmanager
def plan_as_cuda():
    """Within this context fake (shape-only) tensors take the CUDA path: the Triton custom ops,
    whose register_fake versions then run. For planning GPU memory on a machine without one."""
    global _PLAN_AS_CUDA
    previous, _PLAN_AS_CUDA = _PLAN_AS_CUDA, True
    try:
        yield
    finally:
        _PLAN_AS_CUDA = previous


def use_triton(*tensors):
    """True when the Triton kernel (compiled or interpreted) should handle these tensors."""
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    if _PLAN_AS_CUDA and all(isinstance(t, FakeTensor) for t in tensors):
        return True
    return devices == {"cpu"} and INTERPRET


def check_float(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected one of float32, bfloat16, float16")


def calculate_settings(n, max_block=65536):
    """Block size (next power of two >= n) and warp count for a row-wise kernel over width n."""
    block = triton.next_power_of_2(n)
    if block > max_block:
        raise ValueError(f"width {n} exceeds the supported maximum of {max_block} elements per row")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    return block, num_warps


def num_sms(device):
    """Streaming-multiprocessor count of a CUDA device (a fixed small number under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def device_guard(t):
    """Triton launches on the current CUDA device: make it t's (cuda:1 tensors, cuda:0 current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_triton_op(op, fallback, *tensors):
    """The registered ops always run the Triton kernel; say what to call instead when they cannot."""
    if not use_triton(*tensors):
        raise RuntimeError(f"setr_kernels::{op} runs the Triton kernel: it needs CUDA tensors, or CPU tensors "
                           f"with TRITON_INTERPRET=1 (use {fallback}, which falls back to the PyTorch reference)")
