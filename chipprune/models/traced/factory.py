"""Build the dense network a user names: `torchvision:<builder>` or `<module>:<callable>`.

The factory gets `num_classes`, `in_channels` where its signature names it, and the user's
kwargs. Where it cannot take the dataset's channel count (torchvision's builders cannot), the
first conv that reads the image is replaced by one of the same shape reading `in_channels`.
Nothing is downloaded: torchvision builders are called with `weights=None`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

TORCHVISION = "torchvision"


class ArchError(ValueError):
    """An `arch` that names no usable factory, or a factory that gives no usable network."""


def is_external(arch: str) -> bool:
    """Whether `arch` names a factory (`package.module:callable`) rather than a registered model."""
    return ":" in arch


def resolve_factory(arch: str) -> Callable[..., Any]:
    """The callable `arch` names; an ArchError saying what is wrong otherwise."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ArchError(f"arch {arch!r} must be 'torchvision:<builder>' or '<module>:<callable>'")
    if module_name == TORCHVISION:
        import torchvision.models

        known = torchvision.models.list_models(module=torchvision.models)
        if attr not in known:
            raise ArchError(
                f"arch {arch!r}: torchvision has no classification model {attr!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        return torchvision.models.get_model_builder(attr)
    # a module of the user's project: importable from the working directory (DVC and the
    # flows run there), as `python -m` would find it
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ArchError(f"arch {arch!r}: cannot import module {module_name!r} ({e})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ArchError(f"arch {arch!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArchError(f"arch {arch!r}: {attr!r} is a {type(factory).__name__}, not a callable")
    return factory


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def build_dense(
    arch: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]
) -> tuple[nn.Module, str | None]:
    """The dense network and, where its first conv had to be adapted to `in_channels`, that
    conv's qualified name (None where the factory took the channel count itself)."""
    factory = resolve_factory(arch)
    call = dict(kwargs)
    if arch.startswith(f"{TORCHVISION}:"):
        call["weights"] = None  # never a download; `weights:` in params.yaml is a local file
        if arch.endswith(("googlenet", "inception_v3")):
            call.setdefault("aux_logits", False)  # one output: the classifier's
            call.setdefault("init_weights", True)
    takes_channels = _accepts(factory, "in_channels")
    if takes_channels:
        call["in_channels"] = in_channels
    try:
        model = factory(num_classes=num_classes, **call)
    except TypeError as e:
        raise ArchError(
            f"arch {arch!r} rejected its arguments {sorted(['num_classes', *call])}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchError(f"arch {arch!r} returned a {type(model).__name__}, not an nn.Module")
    adapted = None if takes_channels else _adapt_first_conv(arch, model, in_channels)
    return model, adapted


def _adapt_first_conv(arch: str, model: nn.Module, in_channels: int) -> str | None:
    """Give the first nn.Conv2d (module order: torchvision's stem) `in_channels` inputs."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ArchError(f"arch {arch!r}: the network has no nn.Conv2d to prune")
    name, conv = first
    if conv.in_channels == in_channels:
        return None
    if conv.groups != 1:
        raise ArchError(f"arch {arch!r}: first conv {name!r} is grouped; cannot adapt its input")
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return name
