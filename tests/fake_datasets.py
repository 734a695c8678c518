"""Writers of small fake datasets in exactly the real on-disk layouts (pickles, txt indexes, jpg/png).

Images are class- (or label-) dependent so a model can learn them: a bright square whose position
encodes the class, on low-amplitude noise. Each writer returns the ``root`` to pass to the loader.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(label: int, size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """H x W x C uint8 image: noise plus a square at a class-dependent position."""
    img = rng.integers(0, 60, size=(size, size, channels), dtype=np.uint8)
    cells = 4
    step = size // cells
    r, c = divmod(label % (cells * cells), cells)
    img[r * step : (r + 1) * step, c * step : (c + 1) * step] = 230
    return img


def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def write_cifar(root: Path, hundred: bool = False, n_per_batch: int = 20, n_test: int = 20) -> Path:
    """CIFAR python batches.

    ``cifar-10-batches-py/data_batch_{1..5},test_batch`` or ``cifar-100-python/{train,test}``.
    """
    rng = np.random.default_rng(0)
    num_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"fine_labels" if hundred else b"labels"

    def batch(n: int, offset: int) -> dict:
        labels = [(offset + i) % num_classes for i in range(n)]
        data = np.stack([pattern(y, 32, rng).transpose(2, 0, 1).reshape(-1) for y in labels])
        d = {b"data": data, label_key: labels, b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if hundred:
            d[b"coarse_labels"] = [y // 5 for y in labels]
        return d

    if hundred:
        for name, n in (("train", 5 * n_per_batch), ("test", n_test)):
            with open(folder / name, "wb") as f:
                pickle.dump(batch(n, 0), f, protocol=2)
    else:
        for i in range(1, 6):
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump(batch(n_per_batch, i * n_per_batch), f, protocol=2)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump(batch(n_test, 0), f, protocol=2)
    return root


def write_tiny_imagenet(root: Path, num_classes: int = 4, n_train: int = 6, n_val: int = 2) -> Path:
    """``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images, val/val_annotations.txt}``."""
    rng = np.random.default_rng(1)
    base = root / "tiny-imagenet-200"
    wnids = [f"n{1000 + i:08d}" for i in range(num_classes)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for y, w in enumerate(wnids):
        boxes = []
        for i in range(n_train):
            save_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", pattern(y, 64, rng))
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
        (base / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for i in range(n_val):
            name = f"val_{y * n_val + i}.JPEG"
            save_image(base / "val" / "images" / name, pattern(y, 64, rng))
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def write_cub(root: Path, num_classes: int = 4, per_class: int = 5, size: int = 48) -> Path:
    """CUB-200-2011: ``CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt, bounding_boxes.txt, images/<class>/*.jpg}``.

    Images are non-square (size x 1.5 size) like real photos; the class square sits inside the box.
    """
    rng = np.random.default_rng(2)
    base = root / "CUB_200_2011"
    names = [f"{i + 1:03d}.Bird_{i}" for i in range(num_classes)]
    images, labels, split, boxes = [], [], [], []
    k = 0
    for y, name in enumerate(names):
        for i in range(per_class):
            k += 1
            rel = f"{name}/Bird_{y}_{i:04d}.jpg"
            canvas = rng.integers(0, 60, size=(size, size + size // 2, 3), dtype=np.uint8)
            canvas[:, size // 4 : size // 4 + size] = pattern(y, size, rng)
            save_image(base / "images" / rel, canvas)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {y + 1}")
            split.append(f"{k} {0 if i == per_class - 1 else 1}")
            boxes.append(f"{k} {size // 4}.0 0.0 {size}.0 {size}.0")
    for fname, rows in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
        ("classes.txt", [f"{i + 1} {n}" for i, n in enumerate(names)]),
    ):
        (base / fname).write_text("\n".join(rows) + "\n")
    return root


def write_image_folder(
    root: Path, num_classes: int = 3, n_train: int = 6, n_test: int = 2, size: int = 40, test_dir: str = "val"
) -> Path:
    """``<root>/train/<class>/*.png`` and ``<root>/<test_dir>/<class>/*.jpg``."""
    rng = np.random.default_rng(3)
    for y in range(num_classes):
        for i in range(n_train):
            save_image(root / "train" / f"class_{y}" / f"{i}.png", pattern(y, size, rng))
        for i in range(n_test):
            save_image(root / test_dir / f"class_{y}" / f"{i}.jpg", pattern(y, size, rng))
    return root


def write_utkface(
    root: Path, ages: tuple[int, ...] = (1, 10, 20, 30, 45, 60, 75), per_age: int = 5, size: int = 80
) -> Path:
    """``<root>/UTKFace/<age>_<gender>_<race>_<datetime>.jpg.chip.jpg`` (ages outside 1-60 included)."""
    rng = np.random.default_rng(4)
    folder = root / "UTKFace"
    for age in ages:
        for i in range(per_age):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            img[: max(2, size * age // 100)] = 200  # brightness band grows with age
            save_image(folder / f"{age}_{i % 2}_{i % 5}_2017011{i}1745{age:04d}.jpg.chip.jpg", img)
    (folder / "README.txt").write_text("not an image\n")  # stray files are ignored
    return root


def write_steering(root: Path, n: int = 60, size: int = 96, dated: bool = True) -> tuple[Path, np.ndarray]:
    """Sully Chen's driving dataset: ``<root>/data.txt`` ("0.jpg 12.34,<date>") and ``<root>/<i>.jpg``."""
    rng = np.random.default_rng(5)
    angles = np.round(rng.uniform(-80, 90, size=n), 2)
    lines = []
    for i, a in enumerate(angles):
        img = rng.integers(0, 60, size=(size // 2, size, 3), dtype=np.uint8)  # frames are wider than tall
        col = int((a + 90) / 180 * (size - 4))
        img[:, col : col + 4] = 220
        save_image(root / f"{i}.jpg", img)
        lines.append(f"{i}.jpg {a:.6f},2018-07-01 17:09:44:{i:03d}" if dated else f"{i}.jpg {a:.6f}")
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    return root, angles


def write_rc49(root: Path, n_angles: int = 10, per_angle: int = 5) -> Path:
    """``<root>/RC-49_64x64.h5`` with ``images`` (N x 3 x 64 x 64 uint8) and ``labels`` (degrees); needs h5py."""
    import h5py

    rng = np.random.default_rng(6)
    labels = np.repeat(np.linspace(0.1, 89.9, n_angles), per_angle).astype(np.float64)
    images = rng.integers(0, 255, size=(len(labels), 3, 64, 64), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "RC-49_64x64.h5", "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=labels)
        f.create_dataset("types", data=np.repeat(np.arange(len(labels)) % 49, 1))
    return root


def corrupt(path: Path, how: str = "truncate") -> Path:
    """Damage an image file: ``"truncate"`` keeps the first third, ``"empty"`` leaves 0 bytes, ``"garbage"``."""
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "garbage": b"not an image" * 10}[how])
    return path
