"""Datasets and DataModules. Every batch is ``{"image", "label", "index"}``."""

from kd_lightning.data.base import ImageDataModule, IndexedDataset, TensorDataset, stratified_subset
from kd_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule, read_cifar_batch
from kd_lightning.data.cub import CUB200DataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.fine_grained import FGVCAircraftDataModule, MIT67DataModule, StanfordDogsDataModule
from kd_lightning.data.generated import AugmentedDataModule, FilteredDataModule, GeneratedDataModule
from kd_lightning.data.image_files import ImageFileDataset, load_image
from kd_lightning.data.image_folder import ImageFolderDataModule
from kd_lightning.data.imagenet100 import ImageNet100DataModule
from kd_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule, load_mnist_split, read_idx
from kd_lightning.data.query import DigitsEdgeCloud, EdgeCloudSplit, FashionMNISTEdgeCloud, QueryPoolDataModule
from kd_lightning.data.rc49 import RC49DataModule
from kd_lightning.data.rotated import RotatedDataModule
from kd_lightning.data.steering import SteeringAngleDataModule
from kd_lightning.data.svhn import SVHNDataModule, SynDigitsDataModule
from kd_lightning.data.tiny_imagenet import TinyImageNetDataModule
from kd_lightning.data.utkface import UTKFaceDataModule

__all__ = [
    "AugmentedDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CUB200DataModule",
    "DigitsDataModule",
    "DigitsEdgeCloud",
    "EdgeCloudSplit",
    "FGVCAircraftDataModule",
    "FashionMNISTDataModule",
    "FashionMNISTEdgeCloud",
    "FilteredDataModule",
    "GeneratedDataModule",
    "ImageDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImageNet100DataModule",
    "IndexedDataset",
    "MIT67DataModule",
    "MNISTDataModule",
    "QueryPoolDataModule",
    "RC49DataModule",
    "RotatedDataModule",
    "SVHNDataModule",
    "StanfordDogsDataModule",
    "SteeringAngleDataModule",
    "SynDigitsDataModule",
    "TensorDataset",
    "TinyImageNetDataModule",
    "UTKFaceDataModule",
    "load_image",
    "load_mnist_split",
    "read_cifar_batch",
    "read_idx",
    "stratified_subset",
]
