"""Strict checkpoint loading: mmseg SETR checkpoints, timm ViT weights, our single-file export.

Every loader reports missing, unexpected and mis-shaped keys by name, and raises unless the
caller passes strict=False. Files: .safetensors (read with the safetensors package, whatever the
torch release) or PyTorch pickles .pth / .bin (torch.load(weights_only=True)). Weights on the
Hugging Face hub are named `timm/<model>` or `hf-hub:timm/<model>` and come from the local hub
cache (HF_HOME / HF_HUB_CACHE), downloaded there first when online (HF_HUB_OFFLINE=1 forbids it).
"""
import math
import os

import safetensors
import safetensors.torch
import torch

from setr.files import HUB_PREFIX, first_line, is_hub_id, write_atomic
from setr.vit import resize_pos_embed

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm repository on the hub holds


def hub_weights(name):
    """Local path of the weights of hub model `name` (timm/<model> or hf-hub:<org>/<model>):
    model.safetensors, else pytorch_model.bin, from the Hugging Face cache, downloaded into it
    when the hub is reachable and HF_HUB_OFFLINE is not set.

    The cache is read first, without the network. Then one request per file asks the hub whether
    it has it: without a network that fails at once, where hf_hub_download would retry for
    half a minute per file, logging each try."""
    import huggingface_hub  # only for hub names: local files never pay its import
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name

    def not_cached(why):
        return FileNotFoundError(
            f"weights {name}: {HUB_FILES[0]} of {repo} is not in the Hugging Face cache "
            f"{huggingface_hub.constants.HF_HUB_CACHE} and {why}. Fetch "
            f"https://huggingface.co/{repo}/resolve/main/{HUB_FILES[0]} and pass the file itself, or run "
            f"`hf download {repo} {HUB_FILES[0]}` (cache set by HF_HOME / HF_HUB_CACHE) where the hub is reachable")

    for filename in HUB_FILES:
        try:
            return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
        except EntryNotFoundError:  # LocalEntryNotFoundError: not in the cache
            continue
        except ValueError as e:  # not a repository name
            raise ValueError(f"weights {name}: {_first_line(e)}") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise not_cached("HF_HUB_OFFLINE is set")
    for filename in HUB_FILES:
        try:
            huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, filename))  # one try
        except EntryNotFoundError:  # the repository has no such file
            continue
        except HfHubHTTPError as e:  # no such repository, gated, server error
            raise ValueError(f"weights {name}: {type(e).__name__}: {_first_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - no answer: the HTTP client's connection, DNS or timeout error
            raise not_cached(f"the hub cannot be reached ({type(e).__name__}: {_first_line(e)})") from None
        return huggingface_hub.hf_hub_download(repo, filename)
    raise FileNotFoundError(f"weights {name}: the hub repository {repo} has none of {', '.join(HUB_FILES)}")


def _is_safetensors(path):
    """Named .safetensors, or starts as one: 8 bytes of header length, then the JSON header's '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return path.endswith(".safetensors") or head[8:9] == b"{"


def _read(path_or_state_dict):
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict, "<state dict>"
    path = os.fspath(path_or_state_dict)
    if is_hub_id(path):
        path = hub_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path}: empty file")
    try:
        is_safetensors = _is_safetensors(path)
    except OSError as e:
        raise ValueError(f"checkpoint {path}: cannot read it ({e.strerror or e})") from None
    if is_safetensors:
        try:
            return safetensors.torch.load_file(path, device="cpu"), path
        except (safetensors.SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling a text or damaged file fails in any way (KeyError: 101, IndexError, ...)
        raise ValueError(f"checkpoint {path}: not a readable PyTorch checkpoint (.pth / .bin) or safetensors "
                         f"file (torch.load: {type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj, path


def _unwrap(obj, source):
    """The state dict inside an mmseg / timm / our checkpoint ('state_dict' or 'model' wrapper)."""
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {source}: no state dict of tensors found (keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path):
    """(the whole checkpoint dict, its state dict) of a checkpoint file, with clear errors."""
    obj, source = _read(path)
    return obj, _unwrap(obj, source)


def read_checkpoint_meta(path):
    """The `meta` dict of a checkpoint written by export_model ({} for other checkpoints)."""
    obj, _ = _read(path)
    meta = obj.get("meta")
    return dict(meta) if isinstance(meta, dict) and "head" in meta else {}


def _grid(num_tokens, source):
    side = int(math.isqrt(num_tokens - 1))
    if side * side != num_tokens - 1:
        raise ValueError(f"checkpoint {source}: pos_embed has {num_tokens} tokens, not 1 + a square grid")
    return side, side


def _first_line(error):
    return first_line(error, "no details", 200)


def _load_strict(module, state_dict, source, strict, notes):
    """Compare keys and shapes, load what matches, report (and raise when strict)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    report = {"source": source, "missing": missing, "unexpected": unexpected,
              "mismatched": mismatched, "notes": notes}
    if strict and (missing or unexpected or mismatched):
        lines = [f"checkpoint {source} does not match the model:"]
        described = (("missing", missing), ("unexpected", unexpected),
                     ("mis-shaped", [f"{k} (checkpoint {a}, model {b})" for k, a, b in mismatched]))
        for name, items in described:
            if items:
                more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                lines.append(f"  {len(items)} {name} key(s): {', '.join(items[:10])}{more}")
        lines.append("  (pass strict=False to load the matching keys anyway)")
        raise ValueError("\n".join(lines))
    bad = {k for k, _, _ in mismatched}
    loadable = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    with torch.no_grad():
        for k, v in loadable.items():
            own[k].copy_(v)
    return report


def load_mmseg_checkpoint(model, path_or_state_dict, strict=True):
    """Load an mmseg SETR checkpoint (or our export) into a SETR model; returns the report.

    Accepts the file with or without a `state_dict` wrapper. A checkpoint without the patch-embed
    bias (mmseg >= 1.2.0 builds it without) loads with a zero bias, which computes the same.
    A pos_embed trained for another grid is resized bilinearly as mmseg does at run time.
    """
    obj, source = _read(path_or_state_dict)
    state_dict = dict(_unwrap(obj, source))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if meta.get("head") not in (None, model.head):
        raise ValueError(f"checkpoint {source} is for head {meta['head']!r}, the model is {model.head!r}")
    notes = []
    own = model.state_dict()
    bias_key = "backbone.patch_embed.projection.bias"
    if bias_key in own and bias_key not in state_dict and "backbone.patch_embed.projection.weight" in state_dict:
        state_dict[bias_key] = torch.zeros_like(own[bias_key])
        notes.append(f"{bias_key} absent (mmseg >= 1.2 checkpoint): set to zero")
    if bias_key not in own and bias_key in state_dict:
        if torch.count_nonzero(state_dict[bias_key]):
            raise ValueError(f"checkpoint {source} has a non-zero {bias_key} but the model has patch_bias=False")
        del state_dict[bias_key]
        notes.append(f"{bias_key}: zero in the checkpoint, dropped")
    key = "backbone.pos_embed"
    if key in state_dict and key in own and state_dict[key].shape != own[key].shape \
            and state_dict[key].shape[-1] == own[key].shape[-1]:
        src = _grid(state_dict[key].shape[1], source)
        state_dict[key] = resize_pos_embed(state_dict[key], src, model.backbone.grid)
        notes.append(f"{key} resized from {src} to {model.backbone.grid}")
    return _load_strict(model, state_dict, source, strict, notes)


def timm_to_mmseg_key(key):
    """timm ViT key -> mmseg backbone key (None for keys SETR does not use: head, final norm)."""
    if key.startswith("head.") or key.startswith("norm.") or key.startswith("fc_norm."):
        return None
    if key in ("cls_token", "pos_embed"):
        return key
    if key.startswith("patch_embed.proj."):
        return "patch_embed.projection." + key[len("patch_embed.proj."):]
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        table = {
            "norm1.": "ln1.", "norm2.": "ln2.",
            "attn.qkv.weight": "attn.attn.in_proj_weight", "attn.qkv.bias": "attn.attn.in_proj_bias",
            "attn.proj.": "attn.attn.out_proj.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1.",
        }
        for old, new in table.items():
            if rest.startswith(old):
                return f"layers.{i}.{new}{rest[len(old):]}"
    return key  # unknown keys stay as they are and are then reported as unexpected


def load_timm_vit(model, path_or_state_dict, strict=True):
    """Load timm ViT weights (e.g. jx_vit_large_p16_384) into the backbone of a SETR model (or
    into a VisionTransformer). The pos-embed grid is resized bilinearly (24x24 -> 32x32 for a
    384 checkpoint at 512), the classifier `head.*` and the final `norm.*` are dropped (SETR
    has final_norm=False). Returns the report."""
    backbone = getattr(model, "backbone", model)
    obj, source = _read(path_or_state_dict)
    timm_sd = _unwrap(obj, source)
    state_dict, dropped = {}, []
    for k, v in timm_sd.items():
        new = timm_to_mmseg_key(k)
        if new is None:
            dropped.append(k)
        else:
            state_dict[new] = v
    notes = [f"dropped by design (classifier / final norm): {dropped}"] if dropped else []
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape[-1] == backbone.embed_dims:
        src = _grid(state_dict["pos_embed"].shape[1], source)
        if src != backbone.grid:
            state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], src, backbone.grid)
            notes.append(f"pos_embed resized from {src} to {backbone.grid}")
    return _load_strict(backbone, state_dict, source, strict, notes)


def export_model(model_or_state_dict, path, **meta):
    """Write a single-file checkpoint {meta, state_dict} atomically (temp file + rename).

    With a SETR model, meta defaults to model.config; with a state dict, pass at least
    head, backbone and num_classes. Extra meta (class_names, iteration, ...) is stored too.
    """
    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
    else:
        state_dict = model_or_state_dict.state_dict()
        meta = {**model_or_state_dict.config, **meta}
    for required in ("head", "backbone", "num_classes"):
        if required not in meta:
            raise ValueError(f"export_model: meta needs {required!r} (got {sorted(meta)})")
    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_atomic(path, lambda f: torch.save({"meta": meta, "state_dict": state_dict}, f))
