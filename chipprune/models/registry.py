"""Model registry: `@register_model` factories, built by name with `create_model(name, **kw)`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from .base import PrunableNet

_MODELS: dict[str, Callable[..., PrunableNet]] = {}


def register_model(fn: Callable[..., PrunableNet]) -> Callable[..., PrunableNet]:
    """Register a factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> PrunableNet:
    """Build a registered model, or any CNN a factory builds (`torchvision:<builder>`,
    `<module>:<callable>`, traced); kwargs are plain JSON values, so checkpoints can
    rebuild it."""
    if ":" in name:
        from .traced import TracedNet  # imported here: torch.fx and torchvision load lazily

        return TracedNet(name, **kwargs)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


# The in-place initialisers of torch.nn.init: torch's layers and torchvision's models fill
# their weights through them (our models too), so stubbing them skips every random fill.
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                 "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                 "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def weights_uninitialised() -> Iterator[None]:
    """Models built inside keep their parameters as allocated (torch.empty: arbitrary
    values) instead of random-filled: for a model whose every weight is loaded next
    (`load_state_dict(..., strict=True)`) or that is only described. A ResNet-101's random
    fill is most of its construction (0.3 of 0.45 s here), paid by every stage that loads a
    checkpoint. Not thread-safe: it swaps torch.nn.init's functions while it is open."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor
