"""The one checkpoint format: plain dicts of tensors and JSON-like values, saved with
torch.save and read with weights_only=True, so loading never runs code. A checkpoint
carries the model name and kwargs (widths included): the model is rebuilt from it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from chipprune import atomic
from chipprune.models import create_model
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
    """Rebuild the (possibly pruned) model from the checkpoint alone and load its weights."""
    model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['model_name']}: {e}") from e
    return model


def is_pruned(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint holds a pruned model (its kwargs carry widths or kept sets)."""
    return any(k in ckpt["model_kwargs"] for k in PRUNED_KWARGS)


def dense_kwargs(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model kwargs of the checkpoint's dense architecture: the pruned widths dropped."""
    return {k: v for k, v in ckpt["model_kwargs"].items() if k not in PRUNED_KWARGS}
