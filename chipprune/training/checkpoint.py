"""The one checkpoint format: plain dicts of tensors and JSON-like values, saved with
torch.save and read with weights_only=True, so loading never runs code. A checkpoint
carries the model name and kwargs (widths included): the model is rebuilt from it alone."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chipprune import atomic
from chipprune.models import PrunableNet, create_model, weights_uninitialised
from chipprune.surgery.masks import PRUNED_KWARGS

FORMAT = "chipprune.checkpoint/1"
REQUIRED_KEYS = ("format", "model_name", "model_kwargs", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, unsafe or not in our format."""


def make_checkpoint(
    model: nn.Module, model_name: str, model_kwargs: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """A checkpoint dict for `model`; `extra` holds plain values (config, data meta, metrics)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "state_dict": state,
        **extra,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    atomic.torch_save(ckpt, path)


def load_file(path: str | Path) -> Any:
    """torch.load with weights_only=True; any failure becomes one error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled code objects, garbage bytes ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a loadable checkpoint (weights_only load refused or failed: {first_line})"
        ) from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> nn.Module:
    """Rebuild the (possibly pruned) model from the checkpoint alone and load its weights
    (every one: strict, so the random fill a new model would get is skipped)."""
    with weights_uninitialised():
        model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['model_name']}: {e}") from e
    return model


def is_pruned(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint holds a pruned model (its kwargs carry widths or kept sets)."""
    return any(k in ckpt["model_kwargs"] for k in PRUNED_KWARGS)


def dense_kwargs(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model kwargs of the checkpoint's dense architecture: the pruned widths dropped."""
    return {k: v for k, v in ckpt["model_kwargs"].items() if k not in PRUNED_KWARGS}


def dense_model(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's dense architecture with random weights (what its cost and speed are
    fractions of; neither depends on the weights), built once per architecture in this
    process: a stage evaluating every pruned model of a grid builds each dense one once.
    Callers may move it or change its memory format, not its weights."""
    return _dense_model(ckpt["model_name"], json.dumps(dense_kwargs(ckpt), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _dense_model(name: str, kwargs_json: str) -> nn.Module:
    return create_model(name, **json.loads(kwargs_json)).eval()


def load_pretrained(model: PrunableNet, path: str | Path) -> dict[str, Any]:
    """Start `model` (dense) from a local state dict: a torchvision-style `.pth`, one of our
    checkpoints, or a dict holding one under "state_dict" or "model"; read with
    weights_only=True. Keys are the network's own (a traced model's without its "net."
    prefix). A tensor whose shape differs is left as initialised only in the classifier (another
    class count) and the stem conv (another channel count); anywhere else, or a tensor the
    file lacks, is an error. Returns what happened: loaded / reinitialised / unused keys."""
    raw = load_file(path)
    state = raw
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        state = raw["state_dict"]
    elif isinstance(raw, dict) and isinstance(raw.get("state_dict", raw.get("model")), dict):
        state = raw.get("state_dict", raw.get("model"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    prefix = model.WEIGHTS_PREFIX
    spec = model.describe()
    may_differ = {f"{spec.classifier}.weight", f"{spec.classifier}.bias",
                  f"{model._stem_conv()}.weight"}
    own = model.state_dict()
    loaded, reinit, missing, wrong = {}, [], [], []
    for key, t in own.items():
        theirs = state.get(key[len(prefix):] if key.startswith(prefix) else key)
        if theirs is None:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
        elif theirs.shape == t.shape:
            loaded[key] = theirs
        elif key in may_differ:
            reinit.append(key)
        else:
            wrong.append(f"{key} {tuple(theirs.shape)} vs {tuple(t.shape)}")
    if missing or wrong:
        raise CheckpointError(
            f"{path}: does not fit this model: "
            + "; ".join(x for x in (
                f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5
                                            else "") if missing else "",
                f"other shapes: {wrong[:5]}" if wrong else "") if x)
        )
    model.load_state_dict(loaded, strict=False)
    used = {k[len(prefix):] if k.startswith(prefix) else k for k in own}
    return {"loaded": len(loaded), "reinitialised": reinit,
            "unused": sorted(k for k in state if k not in used)}
