"""Prunable CNNs behind one registry: `create_model(name, **kw)`, each with `describe()`."""

from . import resnet, resnet_cifar, vgg  # noqa: F401  (registers the models)
from .base import ChannelMapShortcut, PrunableNet
from .registry import create_model, list_models, register_model
from .spec import Branch, ChannelMap, ModelSpec, PrunableConv

__all__ = [
    "Branch",
    "ChannelMap",
    "ChannelMapShortcut",
    "ModelSpec",
    "PrunableConv",
    "PrunableNet",
    "create_model",
    "list_models",
    "register_model",
]
