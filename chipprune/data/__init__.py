"""Datasets: prepare any source into uint8 tensors + meta (or, for large sets, tar shards of
encoded images: data.shards), save/load the on-disk artifact."""

from .artifact import load_prepared, save_prepared
from .dataset import DataFileError, PreparedDataset, Split, normalize_images
from .prepare import SOURCES, prepare_dataset

__all__ = [
    "SOURCES",
    "DataFileError",
    "PreparedDataset",
    "Split",
    "load_prepared",
    "normalize_images",
    "prepare_dataset",
    "save_prepared",
]
