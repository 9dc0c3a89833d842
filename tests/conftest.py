import importlib
import os

import torch

# Without CUDA the kernel tests run our kernels through Triton's interpreter (read at each launch);
# with CUDA the kernels compile for the GPU, and the kernel tests put their tensors on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

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
