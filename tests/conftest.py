import importlib
import os
import signal
import subprocess
import time

import torch

# The interpreter must be switched on before triton is imported anywhere. With CUDA the kernels
# compile for the GPU, and the kernel tests put their tensors on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
SHARED = os.path.normpath(SHARED)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    config.addinivalue_line("markers", "reference_fallback: a kernel test that checks the fallback to the "
                                       "PyTorch reference on purpose")
    # numpy 2.2 deprecation inside triton 3.6's interpreter (not our code): thousands of lines of noise
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip(f"{SHARED} not found")
    return SHARED


# Test modules whose public kernel calls must run the Triton kernels (compiled on CUDA, interpreted
# on CPU), never fall back to the PyTorch references in their place.
KERNEL_TESTS = ("test_attention", "test_layer_norm", "test_upsample", "test_upsample_cross_entropy",
                "test_model_triton")
KERNEL_MODULES = ("kernels.attention", "kernels.layer_norm", "kernels.upsample", "kernels.upsample_cross_entropy")


@pytest.fixture(autouse=True)
def kernels_not_references(request, monkeypatch):
    """In the kernel tests, a kernel call that would run the PyTorch reference instead fails."""
    if (request.module.__name__.rsplit(".", 1)[-1] not in KERNEL_TESTS
            or request.node.get_closest_marker("reference_fallback")):
        return
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)

        def strict(*tensors, real=module.use_triton, name=name):
            if not real(*tensors):
                devices = sorted({str(t.device) for t in tensors})
                raise AssertionError(f"{name}: tensors on {devices} would run the PyTorch reference instead of "
                                     "the Triton kernel (put them on CUDA, or run with TRITON_INTERPRET=1)")
            return True

        monkeypatch.setattr(module, "use_triton", strict)


def run_process_group(cmd, timeout, what, **popen_kwargs):
    """Run `cmd` in a session of its own; (returncode, stdout, stderr). Past `timeout` seconds its
    whole process group is killed and the test fails; after it ends, no process of the group may
    be left (a few seconds' grace for helpers such as multiprocessing's resource tracker)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s")
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a process of {what} was still alive after it ended")
    return proc.returncode, stdout, stderr


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
