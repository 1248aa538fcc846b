"""Model registry: `@register_model` factories, built by name with `create_model(name, **kw)`."""

from __future__ import annotations

from collections.abc import Callable

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
