"""Data: ImageFolder scanning, seeded stratified splits, transforms, the synthetic X-ray set."""

from .dataset import ImageListDataset
from .images import ImageFolderIndex, load_image, scan_image_folder
from .split import Split, make_split
from .transforms import Preprocess, eval_transform, train_transform

__all__ = [
    "ImageFolderIndex",
    "ImageListDataset",
    "Preprocess",
    "Split",
    "eval_transform",
    "load_image",
    "make_split",
    "scan_image_folder",
    "train_transform",
]
