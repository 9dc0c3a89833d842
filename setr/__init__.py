"""SETR (Zheng et al. 2021) as mmsegmentation builds it, with our Triton kernels on the hot paths.

The names below are imported on first use (PEP 562), so that `import setr.data.ade20k`, the
constants, a command line's `--help` and a DataLoader worker do not pay for torch, triton and
huggingface_hub unless they use the model.
"""
import importlib

_HOMES = {"HEADS": "setr.constants", "SETR": "setr.model", "build_setr": "setr.model",
          "export_model": "setr.weights", "load_mmseg_checkpoint": "setr.weights",
          "load_timm_vit": "setr.weights", "read_checkpoint_meta": "setr.weights"}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    try:  # a submodule used as an attribute: `import setr; setr.weights.read_checkpoint(...)`
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # a dependency of that module is missing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + __all__)
