"""NVIDIA ModelOpt's FastNAS (nvidia-modelopt 0.47, `modelopt.torch.prune.prune(mode="fastnas")`)
as a peer method: its own search under a FLOPs or params constraint equal to our budget,
its result turned into our masks, so surgery, fine-tuning, evaluation and export are ours.

What FastNAS does, as `mtp.prune` runs it: every searchable channel dimension (a conv's
out_channels with the BN and readers it couples to) is sorted by its importance; then, for
each such dimension alone and each width it may take (5% steps of the dense width, multiples
of `channel_divisor`), the score drop of the model narrowed there is measured (the
sensitivity map; BN statistics re-estimated on calibration batches before each score); a
binary search over one threshold on those drops picks the subnet that meets the constraint,
counted by torchprofile on the dummy input (conv and linear MACs, or parameters). The model
is exported in place with each kept channel's weights copied, in importance order.

We read which channels it kept from that export: each kept channel's (gamma, beta) in
every BN that writes its coupling group equals exactly one dense channel's (the search never
trains, and BN calibration changes only the running statistics). Groups FastNAS cannot
search (it does not trace through our option-A shortcuts, so residual streams stay whole)
keep every channel; that is its result, which our counting then measures.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from chipprune.models import PrunableNet

EXTRA = "peers"  # pip install -e '.[peers]' brings nvidia-modelopt and what it imports
SUPPORTED_BUDGETS = ("flops", "params")  # the constraints FastNAS searches under


def modelopt_missing() -> str | None:
    """Why FastNAS cannot run here, or None: checked at params time without importing it."""
    for module, dist in (("modelopt", "nvidia-modelopt"), ("torchprofile", "torchprofile")):
        if importlib.util.find_spec(module) is None:
            return (f"fastnas needs {dist}, which the optional extra {EXTRA!r} installs: "
                    f"pip install -e '.[{EXTRA}]'")
    return None


@contextlib.contextmanager
def _shown_on_error(chatter: io.StringIO):
    try:
        yield
    except BaseException:
        sys.stderr.write(chatter.getvalue()[-4000:])
        raise


def _check_kind(kind: str) -> None:
    if kind not in SUPPORTED_BUDGETS:
        raise ValueError(f"fastnas searches under {' or '.join(SUPPORTED_BUDGETS)} constraints, "
                         f"not {kind!r}")


def divisor_rules(channel_divisor: int) -> dict[str, dict]:
    """FastNAS's per-layer-type search rules with one channel divisor (its default, 32, leaves
    nothing of a CIFAR ResNet prunable): our prune.round_to."""
    conv = {"*": {"channel_divisor": channel_divisor}}
    features = {"*": {"feature_divisor": channel_divisor}}
    return {"nn.Conv2d": conv, "nn.BatchNorm2d": features, "nn.Linear": features}


@dataclass(frozen=True)
class FastNASResult:
    kept: dict[str, list[int]]  # group -> the dense channels FastNAS kept, in its export's order
    its_fraction: float  # the subnet's MACs or params over the dense model's, as FastNAS counts
    its_floor: float  # the same for the smallest subnet of its search space
    seconds: float
    subnet: nn.Module  # FastNAS's own export (its BN statistics re-estimated by its last score)


def search(model: PrunableNet, kind: str, target: float, *,
           score: Callable[[nn.Module], float], calibration: Sequence[Tensor],
           dummy_input: Tensor, channel_divisor: int = 1) -> FastNASResult:
    """Run FastNAS on a copy of `model` (left unchanged) under `kind` <= target x dense and
    return the channels it kept. `score(model)` is maximised (the model comes in eval mode,
    its BN statistics re-estimated on `calibration`, batches of normalised images).

    This is `mtp.prune(mode="fastnas")` in its two steps (convert, then search), with the
    search space profiled in between: where the target is below the smallest subnet FastNAS
    can reach (it keeps what it cannot search whole), FastNAS refuses to search; we search
    at that floor instead, as our thresholding stops at a method's floor, and say so."""
    import modelopt.torch.nas as mtn
    from modelopt.torch.prune.pruning import PruneModeRegistry

    _check_kind(kind)
    start = time.perf_counter()
    # its progress bars and tables (hundreds of lines per search in a stage's log) are kept
    # aside and shown only if the search fails
    chatter = io.StringIO()
    with warnings.catch_warnings(), _shown_on_error(chatter), \
            contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")  # its notes on unsearchable hparams and deprecations
        work = mtn.convert(copy.deepcopy(model).eval(), [("fastnas", divisor_rules(channel_divisor))],
                           registry=PruneModeRegistry)
        _, space = mtn.profile(work, dummy_input=dummy_input, constraints={kind: "100%"},
                               verbose=False, strict=False)
        dense, smallest = float(space["max"][kind]), float(space["min"][kind])
        subnet, state = mtn.search(
            work, {kind: max(target * dense, smallest)}, dummy_input,
            config={"data_loader": list(calibration), "collect_func": lambda batch: batch,
                    "score_func": score, "checkpoint": None, "verbose": False})
    return FastNASResult(kept=kept_channels(model, subnet),
                         its_fraction=float(state["best"]["constraints"][kind]) / dense,
                         its_floor=smallest / dense, seconds=time.perf_counter() - start,
                         subnet=subnet)


@torch.no_grad()
def kept_channels(dense: PrunableNet, subnet: nn.Module) -> dict[str, list[int]]:
    """The dense channels of each coupling group that `subnet` (FastNAS's export of `dense`)
    kept, in the export's order: every kept channel's (gamma, beta) across the group's BNs is
    matched to the dense channel with exactly those values. Raises ValueError for a group
    that cannot be read."""
    spec = dense.describe()
    widths = spec.widths()
    out: dict[str, list[int]] = {}
    for group, convs in spec.groups().items():
        bns = sorted({c.bn for c in convs if isinstance(dense.get_submodule(c.bn), nn.BatchNorm2d)})
        if not bns:
            raise ValueError(f"fastnas: group {group!r} has no BN after its convs, so the "
                             "channels FastNAS kept cannot be read from its export")
        out[group] = _match(group, _signature(dense, bns), _signature(subnet, bns), widths[group])
    return out


def as_keep(kept: dict[str, list[int]], widths: dict[str, int]) -> dict[str, Tensor]:
    """Kept indices as the bool masks thresholding gives."""
    out = {}
    for group, idx in kept.items():
        keep = torch.zeros(widths[group], dtype=torch.bool)
        keep[idx] = True
        out[group] = keep
    return out


def _signature(model: nn.Module, bns: list[str]) -> Tensor:
    """(C, 2 x len(bns)): each channel's gamma and beta in every BN of the group."""
    cols = []
    for name in bns:
        bn = model.get_submodule(name)
        cols += [bn.weight.detach().cpu(), bn.bias.detach().cpu()]
    return torch.stack(cols, dim=1)


def _match(group: str, full: Tensor, mine: Tensor, width: int) -> list[int]:
    if mine.shape[0] > width or mine.shape[1] != full.shape[1]:
        raise ValueError(f"fastnas: group {group!r}: the export has {mine.shape[0]} channels "
                         f"where the dense model has {width}")
    taken = torch.zeros(width, dtype=torch.bool)
    kept = []
    for row in mine:
        hits = ((full == row).all(dim=1) & ~taken).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"fastnas: group {group!r}: a kept channel matches no dense "
                             "channel (the export changed gamma or beta)")
        # channels equal in (gamma, beta) in every BN of the group: the lowest index is taken
        taken[hits[0]] = True
        kept.append(int(hits[0]))
    return kept
