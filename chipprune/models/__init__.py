"""Prunable CNNs behind one registry: `create_model(name, **kw)`, each with `describe()`."""

from . import mobilenetv2, preresnet, resnet, resnet_cifar, vgg, wrn  # noqa: F401  (registers)
from .base import ChannelMapShortcut, ChannelSelect, PrunableNet
from .registry import create_model, list_models, register_model, weights_uninitialised
from .spec import Branch, ChannelMap, FixedConv, ModelSpec, PrunableConv

__all__ = [
    "Branch",
    "ChannelMap",
    "ChannelMapShortcut",
    "ChannelSelect",
    "FixedConv",
    "ModelSpec",
    "PrunableConv",
    "PrunableNet",
    "create_model",
    "list_models",
    "register_model",
    "weights_uninitialised",
]
