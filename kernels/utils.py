"""Launch helpers shared by every kernel family.

Dispatch rule, decided at each call: CUDA tensors run the compiled Triton kernel; CPU tensors run
the same kernel through Triton's interpreter when TRITON_INTERPRET=1 (the tests), and the
plain-PyTorch reference otherwise. TRITON_INTERPRET is read when a kernel is called, so it may be
set after `import kernels`.
"""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

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


def interpret():
    """True when CPU tensors run the kernels through Triton's interpreter: TRITON_INTERPRET=1, now."""
    # triton.knobs.runtime.interpret's rule, on os.environ (which torch.compile can trace)
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


_interpreted = functools.cache(InterpretedFunction)  # one per Python function


def _call_interpreted(fn, *args, **kwargs):
    """A @triton.jit function called from a kernel running in the interpreter. Our own helpers use
    the triton.language module that the kernel's launch patched already; the interpreter's call
    path would patch it again at every call (about a tenth of the interpreted model's time)."""
    if isinstance(fn, Kernel):
        return _interpreted(fn.fn).rewrite()(*args, **kwargs)
    return _interpreted(fn.fn)(*args, **kwargs)


@contextlib.contextmanager
def _interpreting():
    """Run a kernel in Triton's interpreter as if triton had been imported with TRITON_INTERPRET=1:
    the @triton.jit functions it calls (its helpers, and triton.language's own such as tl.sum, which
    triton.jit built for compiling) run in the interpreter too. The interpreter patches
    triton.language while it runs and leaves some patches behind; they are undone here, so that a
    later compiled launch in this process sees triton.language as it was."""
    patched = (tl, tl.core, tl.math, tl.tensor, tl.dtype, tl.core.tensor_descriptor_base)
    saved = [(obj, dict(vars(obj))) for obj in patched]
    compiled_call = JITFunction.__call__
    JITFunction.__call__ = _call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = compiled_call
        for obj, attrs in saved:
            for name in set(vars(obj)) - set(attrs):
                delattr(obj, name)
            for name, value in attrs.items():
                if vars(obj).get(name) is not value:
                    setattr(obj, name, value)


def launch_mode(t):
    """"interpreted" when a kernel launch on tensor t runs in Triton's interpreter (a CPU tensor, with
    TRITON_INTERPRET=1), else "compiled"; launchers pick block sizes by it."""
    return "interpreted" if t.device.type == "cpu" and interpret() else "compiled"


class Kernel(JITFunction):
    """A @triton.jit kernel that picks compiled or interpreted at each launch, from its tensors.

    triton.jit decides once, when it decorates, from TRITON_INTERPRET: every caller would have to
    set the variable before importing triton. Here, with TRITON_INTERPRET=1 at the launch, CPU
    tensors run the function through Triton's interpreter; anything else is a compiled launch."""

    def run(self, *args, grid, warmup, **kwargs):
        if interpret() and any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
            with _interpreting():
                return _interpreted(self.fn).run(*args, grid=grid, warmup=warmup, **kwargs)
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)


def jit(fn):
    """@triton.jit with the launch-time dispatch of Kernel, for our kernels and their helpers."""
    return Kernel(fn)


def use_triton(*tensors):
    """True when the Triton kernel (compiled or interpreted) should handle these tensors."""
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    if _PLAN_AS_CUDA and all(isinstance(t, FakeTensor) for t in tensors):
        return True
    return devices == {"cpu"} and interpret()


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
