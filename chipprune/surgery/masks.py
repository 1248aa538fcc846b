"""The one mask file format (JSON): which ORIGINAL channels each coupling group keeps, with the
model, dataset, method and budget they came from. It drives surgery, transfer and plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chipprune import atomic
from chipprune.models import ModelSpec

FORMAT = "chipprune.masks/1"
REQUIRED_KEYS = ("format", "model", "model_kwargs", "dataset", "method", "budget", "kept", "layers")
BUDGET_KEYS = ("type", "target", "achieved")
PRUNED_KWARGS = ("widths", "kept")  # model kwargs of a pruned model: never in a mask file


class MaskError(ValueError):
    """A mask file or `Masks` that is malformed or does not fit the model; names what is wrong."""


@dataclass(frozen=True)
class Masks:
    """Kept channels per coupling group, as sorted ORIGINAL (dense) indices."""

    model: str  # registry name
    model_kwargs: dict[str, Any]  # dense kwargs: create_model(model, **model_kwargs)
    dataset: str
    method: str  # "chipnet", "chip", "l1", "random", ...
    budget: dict[str, Any]  # {"type": "flops", "target": 0.25, "achieved": 0.2531}
    kept: dict[str, tuple[int, ...]]  # group -> sorted original indices
    layers: dict[str, int]  # prunable conv -> number of kept channels (for people and plots)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific, free-form JSON
    source: str | None = field(default=None, compare=False, repr=False)  # file it came from

    def as_dict(self) -> dict[str, Any]:
        """The JSON document (without `source`)."""
        return {
            "format": FORMAT,
            "model": self.model,
            "model_kwargs": dict(self.model_kwargs),
            "dataset": self.dataset,
            "method": self.method,
            "budget": dict(self.budget),
            "kept": {g: list(idx) for g, idx in self.kept.items()},
            "layers": dict(self.layers),
            "extra": dict(self.extra),
        }


def _where(m: Masks | None = None, source: str | Path | None = None) -> str:
    """Message prefix: the file the masks came from, if any."""
    source = source if source is not None else (m.source if m is not None else None)
    return f"{source}: " if source is not None else "masks: "


def _layers(spec: ModelSpec, kept: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Conv -> kept output channels; 0 for every conv of a removed residual branch."""
    removed = {
        conv
        for br in spec.branches
        if any(g in kept and len(kept[g]) == 0 for g in br.groups)
        for conv in br.convs
    }
    return {
        c.conv: 0 if c.conv in removed else len(kept[c.group])
        for c in spec.convs
        if c.group in kept
    }


def _indices(group: str, keep: Tensor | Sequence[int], width: int | None) -> tuple[int, ...]:
    """Sorted indices from a bool mask (C,) or an index list / integer tensor."""
    if isinstance(keep, Tensor) and keep.dtype == torch.bool:
        if keep.dim() != 1 or (width is not None and keep.numel() != width):
            raise MaskError(
                f"keep[{group!r}]: bool mask of shape {tuple(keep.shape)}, expected ({width},)"
            )
        return tuple(int(i) for i in keep.nonzero().flatten().tolist())
    values = keep.flatten().tolist() if isinstance(keep, Tensor) else list(keep)
    return tuple(sorted(int(i) for i in values))


def masks_from_keep(
    model_name: str,
    model_kwargs: Mapping[str, Any],
    spec: ModelSpec,
    keep: Mapping[str, Tensor | Sequence[int]],
    *,
    dataset: str,
    method: str,
    budget: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Masks:
    """Masks from per-group bool masks (C,) or index lists; `spec` is the DENSE model's."""
    widths = spec.widths()
    kept = {g: _indices(g, k, widths.get(g)) for g, k in keep.items()}
    m = Masks(
        model=model_name,
        model_kwargs=dict(model_kwargs),
        dataset=dataset,
        method=method,
        budget=dict(budget),
        kept=kept,
        layers=_layers(spec, kept),
        extra=dict(extra or {}),
    )
    validate_masks(m, spec)
    return m


def validate_masks(m: Masks, spec: ModelSpec, *, model: str | None = None) -> None:
    """Raise MaskError unless `m` fits `spec`, the spec of the DENSE model (its widths bound the
    indices); `model`, when given, must be the masks' model name.

    Only the group structure must match, not num_classes or in_channels: masks transfer
    between datasets (a CIFAR-100 teacher's masks on a CIFAR-10 student)."""
    where = _where(m)
    if model is not None and m.model != model:
        raise MaskError(f"{where}masks are for model {m.model!r}, not {model!r}")
    dense_kwargs = [k for k in PRUNED_KWARGS if k in m.model_kwargs]
    if dense_kwargs:
        raise MaskError(f"{where}model_kwargs must be the dense model's, found {dense_kwargs}")
    widths = spec.widths()
    unknown = sorted(set(m.kept) - set(widths))
    if unknown:
        raise MaskError(
            f"{where}unknown groups {unknown} for model {m.model!r} (model mismatch?); "
            f"it has {list(widths)}"
        )
    missing = [g for g in widths if g not in m.kept]
    if missing:
        raise MaskError(f"{where}missing groups {missing}: every group needs its kept indices")
    vanishing = {g for br in spec.branches for g in br.groups}
    for g, width in widths.items():
        idx = m.kept[g]
        if len(idx) == 0 and g not in vanishing:
            raise MaskError(
                f"{where}kept[{g!r}] is empty: only the inner groups of a residual branch "
                "may be empty (the branch is then removed); other groups keep a channel"
            )
        bad = [i for i in idx if not 0 <= i < width]
        if bad:
            raise MaskError(f"{where}kept[{g!r}]: indices {bad[:5]} out of range [0, {width})")
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})
            raise MaskError(f"{where}kept[{g!r}]: duplicate indices {dup[:5]}")
        if list(idx) != sorted(idx):
            raise MaskError(f"{where}kept[{g!r}]: indices must be sorted ascending")
    expected = _layers(spec, m.kept)
    for conv in sorted(set(expected) | set(m.layers)):
        if m.layers.get(conv) != expected.get(conv):
            raise MaskError(
                f"{where}layers[{conv!r}] = {m.layers.get(conv)} but its group keeps "
                f"{expected.get(conv)} channels"
            )


def kept_as_bool(m: Masks, spec: ModelSpec) -> dict[str, Tensor]:
    """Group -> bool mask (C,) over the dense channels of `spec` (the dense model's spec)."""
    validate_masks(m, spec)
    out = {}
    for g, width in spec.widths().items():
        mask = torch.zeros(width, dtype=torch.bool)
        mask[list(m.kept[g])] = True
        out[g] = mask
    return out


def save_masks(m: Masks, path: str | Path) -> None:
    """Write the JSON atomically (a reader never sees half a file)."""
    try:
        atomic.write_json(path, m.as_dict())
    except (TypeError, ValueError) as e:  # a non-JSON value in budget / extra / model_kwargs
        raise MaskError(f"{path}: masks are not plain JSON: {e}") from e


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def masks_from_dict(d: Any, source: str | Path | None = None) -> Masks:
    """Check the document's structure and types (not its fit to a model: `validate_masks`)."""
    where = _where(source=source)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise MaskError(f"{where}not a {FORMAT} document")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise MaskError(f"{where}missing keys {missing}")
    for key, kind in (("model", str), ("dataset", str), ("method", str)):
        if not isinstance(d[key], kind):
            raise MaskError(f"{where}{key} must be a string, got {d[key]!r}")
    for key in ("model_kwargs", "budget", "kept", "layers", "extra"):
        if not isinstance(d.get(key, {}), dict):
            raise MaskError(f"{where}{key} must be an object")
    absent = [k for k in BUDGET_KEYS if k not in d["budget"]]
    if absent:
        raise MaskError(f"{where}budget lacks {absent} (needs {list(BUDGET_KEYS)})")
    for g, idx in d["kept"].items():
        if not isinstance(idx, list) or not all(_is_int(i) for i in idx):
            raise MaskError(f"{where}kept[{g!r}] must be a list of integers")
    for conv, n in d["layers"].items():
        if not _is_int(n):
            raise MaskError(f"{where}layers[{conv!r}] must be an integer, got {n!r}")
    return Masks(
        model=d["model"],
        model_kwargs=d["model_kwargs"],
        dataset=d["dataset"],
        method=d["method"],
        budget=d["budget"],
        kept={g: tuple(idx) for g, idx in d["kept"].items()},
        layers=d["layers"],
        extra=d.get("extra", {}),
        source=str(source) if source is not None else None,
    )


def load_masks(path: str | Path, spec: ModelSpec | None = None) -> Masks:
    """Read a mask file; with `spec` (the dense model's) also `validate_masks` against it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MaskError(f"{path}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MaskError(f"{path}: not valid JSON: {e}") from e
    m = masks_from_dict(doc, source=path)
    if spec is not None:
        validate_masks(m, spec)
    return m
