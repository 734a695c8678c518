"""Datasets and DataModules. Every batch is ``{"image", "label", "index"}``."""

from kd_lightning.data.base import ImageDataModule, IndexedDataset, TensorDataset, stratified_subset
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule, load_mnist_split, read_idx

__all__ = [
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "IndexedDataset",
    "MNISTDataModule",
    "TensorDataset",
    "load_mnist_split",
    "read_idx",
    "stratified_subset",
]
