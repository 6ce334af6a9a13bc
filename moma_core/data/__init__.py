"""Data layer of MoMA-FL: synthetic H&E generator, dataset loaders and image transforms."""

from moma_core.data.datasets import (
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    DataError,
    FileImageDataset,
    class_counts,
    csv_manifest,
    image_folder,
    load_dataset,
    npz_arrays,
    split_indices,
)
from moma_core.data.synthetic import (
    SOURCE_CLASSES,
    TARGET_CLASSES,
    TASKS,
    SiteStyle,
    generate,
    site_styles,
    synthetic_dataset,
)
from moma_core.data.transforms import StainJitter, build_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_CLASSES",
    "TARGET_CLASSES",
    "TASKS",
    "ArrayImageDataset",
    "DataError",
    "FileImageDataset",
    "SiteStyle",
    "StainJitter",
    "build_transform",
    "class_counts",
    "csv_manifest",
    "generate",
    "image_folder",
    "load_dataset",
    "npz_arrays",
    "site_styles",
    "split_indices",
    "synthetic_dataset",
]
