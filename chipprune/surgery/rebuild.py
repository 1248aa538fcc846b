"""Keep-masks -> a physically smaller model: rebuild the model at the kept widths and copy every
weight sliced to the kept channels, reading only the model's `describe()` spec.

Why rebuild + slice rather than torch-pruning: torch-pruning's DependencyGraph treats an
option-A shortcut (an index_select / zero-pad) as element-wise and so couples the channels of
the groups it joins, which is wrong for our channel maps; building the model from `widths` and
`kept` gives channel maps that gather the right ORIGINAL channels, and the tests check our
coupling groups against torch-pruning for the nets without channel maps (tests/test_models.py).

Indices are always ORIGINAL (dense) channel indices. The source model may itself be pruned:
its `model_kwargs` (`widths` / `kept`) say which original channels it holds, and the new kept
sets must be subsets of those (pruning twice equals pruning once with the final sets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from chipprune.models import PrunableNet, create_model, weights_uninitialised
from chipprune.models.slicing import slice_plan, slice_tensor
from chipprune.surgery.masks import PRUNED_KWARGS


def _source_kept(model: PrunableNet, model_kwargs: Mapping[str, Any]) -> dict[str, list[int]]:
    """Group -> ORIGINAL indices of the channels the source model holds, in its order."""
    widths_now = model.describe().widths()
    widths, kept = model_kwargs.get("widths") or {}, model_kwargs.get("kept") or {}
    out = {}
    for g, now in widths_now.items():
        # as GroupWidths reads them: kept indices, else the first `width`, else dense
        idx = [int(i) for i in kept[g]] if g in kept else list(range(widths.get(g, now)))
        if len(idx) != now:
            raise ValueError(
                f"model_kwargs do not describe this model: group {g!r} has {now} channels, "
                f"the kwargs say {len(idx)}"
            )
        out[g] = idx
    return out


def _positions(group: str, new: list[int], source: list[int], device) -> Tensor:
    """Positions in the source model of the ORIGINAL channels `new`: (len(new),) long."""
    where = {orig: pos for pos, orig in enumerate(source)}
    gone = [i for i in new if i not in where]
    if gone:
        raise ValueError(
            f"kept[{group!r}]: original channels {gone[:5]} are not in the source model "
            f"(out of range, or pruned already; it holds {len(source)} of this group)"
        )
    return torch.tensor([where[i] for i in new], dtype=torch.long, device=device)


def prune_model(
    model: PrunableNet,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    kept: Mapping[str, Sequence[int]],
) -> tuple[PrunableNet, dict[str, Any]]:
    """The model keeping, per group, the ORIGINAL channels `kept[group]` (in that order; groups
    left out keep what the source has), and its full kwargs: the dense kwargs plus `widths`
    and `kept`, so `create_model(model_name, **kwargs)` (and a checkpoint) rebuilds it.

    `model_kwargs` are the ones `model` was built with (dense, or already pruned).
    The new model has the source's dtype, device and train/eval mode.
    """
    source = _source_kept(model, model_kwargs)
    unknown = sorted(set(kept) - set(source))
    if unknown:
        raise ValueError(f"unknown groups {unknown}; {model_name} has {list(source)}")
    # groups the source already prunes carry over; the rest stay dense (left out of kwargs)
    carried = set(model_kwargs.get("widths") or {}) | set(model_kwargs.get("kept") or {})
    new_kept = {g: list(source[g]) for g in source if g in carried}
    # groups of branches the source has removed already stay removed (empty), and a branch
    # with one empty group goes as a whole, so its other groups are emptied too
    new_kept.update({g: [] for g in carried if g not in source})
    for br in model.describe().branches:
        if any(g in new_kept and not new_kept[g] for g in br.groups):
            new_kept.update({g: [] for g in br.groups})
    new_kept.update({g: [int(i) for i in idx] for g, idx in kept.items()})
    dense_kwargs = {k: v for k, v in model_kwargs.items() if k not in PRUNED_KWARGS}
    kwargs = {
        **dense_kwargs,
        "widths": {g: len(idx) for g, idx in new_kept.items()},
        "kept": new_kept,
    }

    first = next(model.parameters())
    pos = {g: _positions(g, new_kept.get(g, source[g]), source[g], first.device) for g in source}
    plan = slice_plan(model, pos)
    state = {}
    for key, t in model.state_dict().items():
        state[key] = slice_tensor(t, plan.get(key, ()))  # not in the plan (num_batches_tracked, VGG's BatchNorm1d ...): as is

    # the constructor checks kept against the dense widths and wires the channel maps; no
    # random fill: every tensor is loaded below, strictly (VGG-11's 100M-parameter classifier
    # at 32x32 took most of a rebuild to fill)
    with weights_uninitialised():
        new = create_model(model_name, **kwargs).to(device=first.device, dtype=first.dtype)
    expected = new.state_dict()
    # orphan removal: the tensors of branches the new model no longer has are dropped
    kept_blocks = {br.block for br in new.describe().branches}
    removed = tuple(
        f"{br.block}." for br in model.describe().branches if br.block not in kept_blocks
    )
    for key in [k for k in state if k.startswith(removed) and k not in expected]:
        del state[key]
    if set(expected) != set(state):
        raise ValueError(f"{model_name}: state_dict keys differ after rebuilding")
    for key, t in state.items():
        if t.shape != expected[key].shape:
            raise ValueError(
                f"{model_name}: {key} sliced to {tuple(t.shape)} but the pruned model has "
                f"{tuple(expected[key].shape)}; describe() does not cover this tensor"
            )
    new.load_state_dict(state)
    new.train(model.training)
    return new, kwargs
