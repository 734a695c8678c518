"""Fake files in the real on-disk formats of SVHN, Synthetic Digits, Stanford Dogs, MIT67, FGVC-Aircraft and
ImageNet(-100), written with the same class-dependent images as :mod:`tests.fake_datasets`.

The ``.mat`` files are written with :func:`scipy.io.savemat` in MATLAB v5 format, like the originals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from tests.fake_datasets import pattern, save_image


def save_mat(path: Path, **variables: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables, format="5")
    return path


def cell(strings: list[str]) -> np.ndarray:
    """A MATLAB N x 1 cell array of strings."""
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = s
    return out


def svhn_arrays(labels: list[int], rng: np.random.Generator, digit_of=lambda y: y % 10) -> dict[str, np.ndarray]:
    """SVHN-format variables: ``X`` (32 x 32 x 3 x N uint8) and ``y`` (N x 1) holding ``labels`` as given."""
    images = np.stack([pattern(digit_of(y), 32, rng) for y in labels])  # N x H x W x C
    return {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": np.asarray(labels, np.uint8)[:, None]}


def write_svhn(root: Path, n_train: int = 40, n_test: int = 20, n_extra: int = 10) -> Path:
    """``<root>/{train,test,extra}_32x32.mat``; labels cycle through 1..10 (10 is the digit 0, as in SVHN)."""
    rng = np.random.default_rng(7)
    for name, n in (("train", n_train), ("test", n_test), ("extra", n_extra)):
        save_mat(root / f"{name}_32x32.mat", **svhn_arrays([1 + i % 10 for i in range(n)], rng))
    return root


def write_syn_digits(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Ganin's Synthetic Digits release: ``<root>/synth_{train,test}_32x32.mat`` (labels 0..9)."""
    rng = np.random.default_rng(8)
    for name, n in (("train", n_train), ("test", n_test)):
        save_mat(root / f"synth_{name}_32x32.mat", **svhn_arrays([i % 10 for i in range(n)], rng))
    return root


def write_syn_digits_torch(root: Path, n_train: int = 30, n_test: int = 10, nested: bool = False) -> Path:
    """The re-pack MEKD's code downloads: ``synth_{train,test}.pt``, each ``torch.save((images, labels))`` with
    images N x 32 x 32 x 3 uint8; ``nested`` puts them in ``SyntheticDigits/processed/`` as that code does."""
    import torch

    rng = np.random.default_rng(13)
    folder = root / "SyntheticDigits" / "processed" if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [i % 10 for i in range(n)]
        images = torch.from_numpy(np.stack([pattern(y, 32, rng) for y in labels]))
        torch.save((images, torch.tensor(labels)), folder / f"synth_{name}.pt")
    return root


def write_stanford_dogs(
    root: Path, num_classes: int = 4, n_train: int = 4, n_test: int = 2, size: int = 40, flat_lists: bool = False
) -> Path:
    """``<root>/Images/<wnid>-<breed>/<wnid>_<n>.jpg`` and ``<root>/lists/{train,test}_list.mat``.

    The lists hold ``file_list``, ``annotation_list`` (cells) and ``labels`` (N x 1 doubles, 1-based) like
    the originals; ``flat_lists`` puts the ``.mat`` files directly in ``root`` (as ``lists.tar`` extracts).
    """
    rng = np.random.default_rng(9)
    breeds = [f"n02{85620 + 100 * i:06d}-Breed_{i}" for i in range(num_classes)]
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for y, breed in enumerate(breeds):
        wnid = breed.split("-")[0]
        for k in range(n_train + n_test):
            rel = f"{breed}/{wnid}_{1000 + k}.jpg"
            img = rng.integers(0, 60, size=(size, size + size // 4, 3), dtype=np.uint8)  # photos are not square
            img[:, :size] = pattern(y, size, rng)
            save_image(root / "Images" / rel, img)
            rows["train" if k < n_train else "test"].append((rel, y + 1))
    for split, items in rows.items():
        rng.shuffle(items)  # the loader must not rely on the order of the list
        files = [r for r, _ in items]
        save_mat(
            (root if flat_lists else root / "lists") / f"{split}_list.mat",
            file_list=cell(files),
            annotation_list=cell([f.rsplit(".", 1)[0] for f in files]),
            labels=np.asarray([y for _, y in items], np.float64)[:, None],
        )
    return root


def write_mit67(root: Path, num_classes: int = 3, n_train: int = 4, n_test: int = 2, size: int = 40) -> Path:
    """``<root>/Images/<category>/*.jpg`` and ``<root>/{TrainImages,TestImages}.txt`` ("<category>/<file>")."""
    rng = np.random.default_rng(10)
    categories = ["airport_inside", "bakery", "winecellar", "bowling", "kitchen"][:num_classes]
    lists: dict[str, list[str]] = {"TrainImages.txt": [], "TestImages.txt": []}
    for y, cat in enumerate(categories):
        for k in range(n_train + n_test):
            rel = f"{cat}/{cat}_{k:04d}.jpg"
            img = pattern(y, size, rng)
            if k == 0:  # MIT67 holds some greyscale photos; they load as RGB
                img = img[..., :1]
            save_image(root / "Images" / rel, img)
            lists["TrainImages.txt" if k < n_train else "TestImages.txt"].append(rel)
    save_image(root / "Images" / categories[0] / "unlisted.jpg", pattern(0, size, rng))  # not in a split: ignored
    for name, rels in lists.items():
        (root / name).write_text("\n".join(rels) + "\n")
    return root


FGVC_VARIANTS = ("707-320", "A300B4", "Cessna 172", "F-16A/B")


def write_fgvc_aircraft(
    root: Path, variants: tuple[str, ...] = FGVC_VARIANTS, per_split: int = 2, size: int = 40
) -> Path:
    """``<root>/fgvc-aircraft-2013b/data/{variants.txt, images/<id>.jpg, images_variant_<split>.txt}``.

    Every variant gets ``per_split`` images in each of train, val and test; ``trainval`` is train + val.
    """
    rng = np.random.default_rng(11)
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    image_id = 1000000
    for y, variant in enumerate(variants):
        for split in lists:
            for _ in range(per_split):
                image_id += 7
                save_image(data / "images" / f"{image_id:07d}.jpg", pattern(y, size, rng))
                lists[split].append(f"{image_id:07d} {variant}")
    lists["trainval"] = sorted(lists["train"] + lists["val"])
    for split, rows in lists.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def write_imagenet(root: Path, wnids: list[str], n_train: int = 3, n_val: int = 1, size: int = 32) -> Path:
    """ImageNet's folder layout: ``<root>/train/<wnid>/<wnid>_<n>.JPEG`` and ``<root>/val/<wnid>/*.JPEG``."""
    rng = np.random.default_rng(12)
    k = 0
    for y, wnid in enumerate(wnids):
        for i in range(n_train):
            save_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", pattern(y, size, rng))
        for _ in range(n_val):
            k += 1
            save_image(root / "val" / wnid / f"ILSVRC2012_val_{k:08d}.JPEG", pattern(y, size, rng))
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Keep the first ``keep`` share of a file's bytes (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
