"""Stanford Dogs, MIT67 and FGVC-Aircraft in their own on-disk formats (AI-KD's fine-grained sets, Table 1).

Each reads the official train/test lists, resizes every image to ``image_size`` (224 by default,
the AI-KD setting) on load, and carves validation from the training split as everywhere else.

Stanford Dogs (Khosla et al., 2011; ``images.tar`` + ``lists.tar``): 120 breeds, 12,000 train / 8,580 test::

    <root>/Images/<wnid>-<breed>/<wnid>_<n>.jpg
    <root>/lists/train_list.mat, test_list.mat     file_list (cell of "<folder>/<file>.jpg"), labels (1..120)

(``lists.tar`` extracts its ``.mat`` files flat: ``<root>/train_list.mat`` is found too.)

MIT67 (Quattoni & Torralba, 2009; ``indoorCVPR_09.tar`` + the two split files): 67 indoor scenes,
5,360 train / 1,340 test::

    <root>/Images/<category>/<file>.jpg
    <root>/TrainImages.txt, TestImages.txt          one "<category>/<file>.jpg" per line

FGVC-Aircraft (Maji et al., 2013; ``fgvc-aircraft-2013b.tar.gz``) at the variant level, 100 classes,
6,667 trainval / 3,333 test::

    <root>/fgvc-aircraft-2013b/data/images/<id>.jpg
    <root>/fgvc-aircraft-2013b/data/variants.txt                      one variant name per line (the classes)
    <root>/fgvc-aircraft-2013b/data/images_variant_{train,val,trainval,test}.txt   "<id> <variant name>"

``root`` may also point at ``fgvc-aircraft-2013b`` or its ``data`` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split
from kd_lightning.data.image_files import ImageFileDataset, require_dir, require_file
from kd_lightning.data.matfile import mat_labels, mat_strings, read_mat
from kd_lightning.errors import ConfigError, DataNotFoundError


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the non-blank lines of a text index file."""
    require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataNotFoundError(f"{what}: {str(path)!r} is unreadable ({e}); expected a text file") from None
    rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not rows:
        raise DataNotFoundError(f"{what}: {str(path)!r} is empty")
    return rows


class FineGrainedDataModule(ImageDataModule):
    """Base of the image-file fine-grained sets: 224 px, ImageNet statistics, images resized on load.

    The shared recipes under ``recipes/finegrained/`` name this class with the settings common to the
    three sets; each dataset's override replaces it with the concrete DataModule.

    Args:
        root: dataset folder (each subclass documents its layout).
        verify: decode every image once at setup (corrupt files always fail when loaded).
        image_size: side of the square images fed to the net (default 224).
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    native_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    name = "dataset"
    layout = ""
    class_dir: str | None = None  # folder under root whose sub-folders are the classes, if any

    def __init__(
        self, root: str | None = None, verify: bool = False, image_size: int | None = None, **kwargs: Any
    ) -> None:
        if type(self) is FineGrainedDataModule:
            raise ConfigError(
                "FineGrainedDataModule is the shared base of the fine-grained recipes; stack a dataset's override on "
                "it, e.g. --config recipes/finegrained/aikd.yaml --config recipes/stanford_dogs/aikd.yaml"
            )
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.native_size = self.image_size  # images are resized to image_size on load
        self.verify = verify
        classes = self._classes_if_present()
        if classes is not None:
            self.num_classes = len(classes)

    def _root(self) -> Path:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder holding {self.layout}>")
        root = Path(self.root)
        if not root.is_dir():
            raise DataNotFoundError(f"{self.name} not found: root={str(root)!r} does not exist; expected {self.layout}")
        return root

    def _classes_if_present(self) -> list[str] | None:
        """The class names when the files are there (so ``num_classes`` fits a fake or partial copy)."""
        if self.root is None or self.class_dir is None:
            return None
        folder = Path(self.root) / self.class_dir
        return class_folders(folder) if folder.is_dir() else None

    def _dataset(self, paths: list[Path], labels: list[int]) -> Dataset:
        return ImageFileDataset(paths, labels, size=self.native_size, verify=self.verify)


class StanfordDogsDataModule(FineGrainedDataModule):
    """Stanford Dogs, 120 breeds, the official 100-per-class training split (see the module docstring)."""

    num_classes = 120
    name = "Stanford Dogs"
    layout = "Images/<breed folder>/*.jpg and lists/{train,test}_list.mat"
    class_dir = "Images"

    def _list_file(self, split: Split) -> Path:
        root = self._root()
        name = f"{split}_list.mat"
        for cand in (root / "lists" / name, root / name):
            if cand.is_file():
                return cand
        raise DataNotFoundError(
            f"Stanford Dogs split list not found: neither {str(root / 'lists' / name)!r} nor {str(root / name)!r} "
            "exists; expected the .mat files of lists.tar"
        )

    def build_dataset(self, split: Split) -> Dataset:
        images = require_dir(self._root() / "Images", "Stanford Dogs images (extracted images.tar)")
        classes = class_folders(images)
        path = self._list_file(split)
        d = read_mat(path, ("file_list", "labels"), f"Stanford Dogs {split} list")
        files = mat_strings(d["file_list"], path, "file_list")
        labels = mat_labels(d["labels"], path, "labels", count=len(files))
        paths, ys = [], []
        for rel, y in zip(files, labels.tolist()):
            folder = rel.replace("\\", "/").split("/")[0]
            if not 1 <= y <= len(classes) or classes[y - 1] != folder:
                raise DataNotFoundError(
                    f"{str(path)!r}: {rel!r} has label {y}; expected the 1-based position of its folder {folder!r} "
                    f"among the {len(classes)} sorted breed folders of {str(images)!r}"
                )
            paths.append(images / rel)
            ys.append(y - 1)
        if not paths:
            raise DataNotFoundError(f"{str(path)!r} lists no images")
        return self._dataset(paths, ys)


class MIT67DataModule(FineGrainedDataModule):
    """MIT67 indoor scenes, 67 categories, the official 80/20-per-class split (see the module docstring)."""

    num_classes = 67
    name = "MIT67"
    layout = "Images/<category>/*.jpg, TrainImages.txt and TestImages.txt"
    class_dir = "Images"
    list_files: ClassVar[dict[str, str]] = {"train": "TrainImages.txt", "test": "TestImages.txt"}

    def build_dataset(self, split: Split) -> Dataset:
        root = self._root()
        images = require_dir(root / "Images", "MIT67 images (extracted indoorCVPR_09.tar)")
        index = {c: i for i, c in enumerate(class_folders(images))}
        path = root / self.list_files[split]
        paths, ys = [], []
        for n, rel in read_lines(path, f"MIT67 {split} list"):
            category = rel.replace("\\", "/").split("/")[0]
            if "/" not in rel.replace("\\", "/") or category not in index:
                raise DataNotFoundError(
                    f"{path}:{n}: {rel!r}; expected '<category>/<file>' with a category folder under {str(images)!r}"
                )
            paths.append(images / rel)
            ys.append(index[category])
        return self._dataset(paths, ys)


class FGVCAircraftDataModule(FineGrainedDataModule):
    """FGVC-Aircraft at the variant level (100 classes), trained on ``trainval`` as AI-KD's Table 1 counts.

    Args:
        train_split: official list used for training, ``"trainval"`` (6,667 images) or ``"train"`` (3,334);
            validation is carved from it in both cases, the test split is ``images_variant_test.txt``.
        **kwargs: see :class:`FineGrainedDataModule`.
    """

    num_classes = 100
    name = "FGVC-Aircraft"
    layout = "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_*.txt}"
    folder = "fgvc-aircraft-2013b"

    def __init__(
        self, root: str | None = None, train_split: Literal["trainval", "train"] = "trainval", **kwargs: Any
    ) -> None:
        if train_split not in ("trainval", "train"):
            raise ConfigError(f"train_split={train_split!r}; expected 'trainval' or 'train'")
        self.train_split = train_split
        super().__init__(root=root, **kwargs)

    def _data_dir(self) -> Path:
        root = self._root()
        for cand in (root / self.folder / "data", root / "data", root):
            if (cand / "variants.txt").is_file():
                return cand
        raise DataNotFoundError(
            f"FGVC-Aircraft not found under root={str(root)!r}: no variants.txt in {str(root / self.folder / 'data')!r}"
            f" (or {str(root / 'data')!r}, {str(root)!r}); expected the extracted fgvc-aircraft-2013b.tar.gz"
        )

    def _variants(self, data: Path) -> list[str]:
        variants = [v for _, v in read_lines(data / "variants.txt", "FGVC-Aircraft class list")]
        if len(set(variants)) != len(variants):
            raise DataNotFoundError(f"{data / 'variants.txt'} lists a variant twice")
        return variants

    def _classes_if_present(self) -> list[str] | None:
        if self.root is None:
            return None
        try:
            return self._variants(self._data_dir())
        except DataNotFoundError:  # reported by setup(), with the full message
            return None

    def build_dataset(self, split: Split) -> Dataset:
        data = self._data_dir()
        index = {v: i for i, v in enumerate(self._variants(data))}
        name = self.train_split if split == "train" else "test"
        path = data / f"images_variant_{name}.txt"
        paths, ys = [], []
        for n, line in read_lines(path, f"FGVC-Aircraft {name} list"):
            parts = line.split(" ", 1)
            if len(parts) != 2 or parts[1].strip() not in index:
                raise DataNotFoundError(f"{path}:{n}: {line!r}; expected '<image id> <variant listed in variants.txt>'")
            paths.append(data / "images" / f"{parts[0]}.jpg")
            ys.append(index[parts[1].strip()])
        return self._dataset(paths, ys)
