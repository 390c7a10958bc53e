"""Data layer of apart_fast: datasets as resident uint8 tensors and a device-side augmenting loader."""

from .datasets import DATASET_NAMES, ImageData, load_dataset, random_subset
from .errors import DataError
from .folder import default_cache_dir
from .loader import Batch, DeviceLoader, augment_batch, decode_uint8, iter_eval

__all__ = [
    "DATASET_NAMES",
    "Batch",
    "DataError",
    "DeviceLoader",
    "ImageData",
    "augment_batch",
    "decode_uint8",
    "default_cache_dir",
    "iter_eval",
    "load_dataset",
    "random_subset",
]
