"""Builders the test modules share: paths, quiet-trainer arguments, fake checkpoints, small models, runs.

Test modules import from here (and from the fake-data writers in ``fake_datasets*.py``), never from each other.
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data import DigitsDataModule, TensorDataset
from kd_lightning.data.base import ImageDataModule
from kd_lightning.methods import DistillModule, ImageClassifier, ImageRegressor, SSKDTeacherHead
from kd_lightning.methods.density_ratio import DensityRatioEstimator
from kd_lightning.methods.gan import CcGAN, ConditionalGAN
from kd_lightning.sampling.generate import GenerateConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
#: command-line arguments that shrink a recipe's images to 32 px (fake datasets are small)
SIZE32 = ("--data.init_args.image_size", "32")
DIGITS_STUDENT = RECIPES / "digits" / "student.yaml"

# ------------------------------------------------------------------------------------------- quiet trainers
#: command-line arguments for a quiet ``kdl`` run that keeps its logger: no progress bar, no model summary
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: command-line arguments for a quiet ``kdl`` run without logger files
QUIET_TRAINER = ["--trainer.logger", "false", *QUIET]
#: the same as Trainer keyword arguments
QUIET_TRAINER_KW = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def quiet_trainer(tmp_path: Path, **kw) -> L.Trainer:
    """A CPU Trainer that writes nothing but what the test asks for (no logger, no checkpoints)."""
    return L.Trainer(default_root_dir=tmp_path, enable_checkpointing=False, accelerator="cpu", **QUIET_TRAINER_KW, **kw)


# ----------------------------------------------------------------------------------------------- recipes
def recipe_data_class(path: Path) -> str:
    data = yaml.safe_load(path.read_text())["data"]
    if isinstance(data, str):  # the section's own file (``data: data.yaml``), relative to the recipe
        data = yaml.safe_load((path.parent / data).read_text())
    return str(data["class_path"]).rsplit(".", 1)[-1]


def is_section_file(path: Path) -> bool:
    """A file that holds one section of recipes (``data: data.yaml`` names it), not a recipe."""
    content = yaml.safe_load(path.read_text())
    return isinstance(content, dict) and "class_path" in content


def recipe_model_class(path: Path) -> str:
    return str(yaml.safe_load(path.read_text())["model"]["class_path"]).rsplit(".", 1)[-1]


# -------------------------------------------------------------------------------------------- fake data
def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzipped when ``path`` ends in .gz)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fake_mnist(root: Path, n_train: int = 120, n_test: int = 40, size: int = 28, gz: bool = True) -> Path:
    """Four MNIST-format idx files with class-dependent images (learnable, 10 classes)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, y in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * y : 4 + 2 * y, 4:-4] = 250
        write_idx(root / f"{split}-images-idx3-ubyte{sfx}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", labels)
    return root


# ------------------------------------------------------------------------------------- fake checkpoints
def write_teacher(
    path: Path,
    num_classes: int | None,
    in_channels: int = 1,
    image_size: int | None = None,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
    net: str = "tinynet",
) -> Path:
    """A random classifier (regressor when ``num_classes`` is None) saved with the keys a kdl run writes: a
    teacher, S_sup or any other trained model a recipe names."""
    cls = ImageClassifier if num_classes else ImageRegressor
    extra: dict = {"num_classes": num_classes} if num_classes else {"label_range": (0.0, 1.0)}
    if image_size is not None:
        extra["image_size"] = image_size
    model = cls(net=net, in_channels=in_channels, mean=mean, std=std, **extra)
    hp = {**dict(model.hparams), "_class_path": f"kd_lightning.methods.{cls.__name__}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp}, path)
    return path


def write_sskd_teacher_head(
    path: Path, teacher: Path, num_classes: int, in_channels: int, image_size: int, mean: tuple, std: tuple
) -> Path:
    """An (untrained) SSKDTeacherHead of ``teacher`` saved with the keys a kdl run writes."""
    model = SSKDTeacherHead(
        teacher=str(teacher),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


# --------------------------------------------------------------------------------- small trained models
def digits_classifier(**kw) -> tuple[ImageClassifier, DigitsDataModule]:
    dm = DigitsDataModule(batch_size=64, augment=False)
    model = ImageClassifier(
        net="tinynet",
        num_classes=10,
        in_channels=1,
        mean=dm.mean,
        std=dm.std,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        **kw,
    )
    return model, dm


def digits_student(teacher: Path, losses: list, dm: DigitsDataModule | None = None, **kw) -> DistillModule:
    """A tinynet DistillModule student of ``teacher`` on 8x8 digits with ``losses`` (SGD, lr 0.05 by default)."""
    dm = dm or DigitsDataModule(batch_size=32, augment=False)
    kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05))
    return DistillModule(
        teacher=str(teacher),
        kd_losses=losses,
        net="tinynet",
        num_classes=10,
        in_channels=1,
        image_size=8,
        mean=dm.mean,
        std=dm.std,
        **kw,
    )


class DigitValue(ImageDataModule):
    """Digits as regression: predict the digit's value in [0, 9]."""

    in_channels, native_size, mean, std, hflip = 1, 8, (0.3,), (0.38,), False
    task, label_range = "regression", (0.0, 9.0)

    def build_dataset(self, split: str) -> Dataset:
        base = DigitsDataModule().build_dataset(split)
        return TensorDataset(base.images, base.labels.float())


def digit_value_regressor() -> tuple[ImageRegressor, DigitValue]:
    dm = DigitValue(batch_size=64, augment=False)
    model = ImageRegressor(
        net="tinynet",
        in_channels=1,
        mean=dm.mean,
        std=dm.std,
        label_range=dm.label_range,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    return model, dm


def fit_and_save(model: L.LightningModule, dm: L.LightningDataModule, path: Path, **trainer_kw) -> Path:
    trainer = quiet_trainer(path.parent, **trainer_kw)
    trainer.fit(model, dm)
    trainer.save_checkpoint(path)
    return path


# ------------------------------------------------------------------------ interrupted and resumed runs
#: ``recipes/digits/student.yaml`` cut down: 200 training images, batch 32 -> 6 steps per epoch; 3 epochs
RESUME_ARGS = [
    "--model.init_args.net",
    "tinynet",
    "--trainer.max_epochs",
    "3",
    "--data.init_args.train_size",
    "200",
    "--data.init_args.batch_size",
    "32",
    *QUIET_TRAINER,
    "--model.init_args.lr_scheduler.init_args.T_max",
    "3",
]
STEPS_PER_EPOCH = 6


class Interrupt(L.Callback):
    """Stop a run once, at (epoch, batch) of ``where``: by SIGTERM to ourselves or by raising."""

    def __init__(self, where: str, epoch: int, batch: int = 0, how: str = "signal") -> None:
        self.where, self.epoch, self.batch, self.how = where, epoch, batch, how

    def _fire(self, trainer: L.Trainer, where: str, batch: int = 0) -> None:
        if where != self.where or trainer.current_epoch != self.epoch or batch != self.batch:
            return
        if trainer.sanity_checking:
            return
        if self.how == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise RuntimeError(f"injected crash at {where} epoch {self.epoch} batch {self.batch}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._fire(trainer, "train", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._fire(trainer, "val", batch_idx)

    def on_train_epoch_start(self, trainer, pl_module):
        self._fire(trainer, "epoch_start")


def final_state(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, optimiser state and step, as one flat dict of tensors."""
    ckpt = load_checkpoint(path)
    state: dict[str, torch.Tensor] = {}

    def flatten(prefix: str, value: Any) -> None:  # a module's extra state (a per-sample store) is a nested dict
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            state[prefix] = value
        else:
            state[prefix] = torch.tensor(value)

    for k, v in ckpt["state_dict"].items():
        flatten(f"model.{k}", v)
    for i, s in enumerate(ckpt["optimizer_states"][0]["state"].values()):
        state.update({f"optim.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    state["global_step"] = torch.tensor(ckpt["global_step"])
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differing, f"tensors differ after resume (max abs diff): {differing}"


#: a quiet ``kdl fit`` of the digits student recipe on 200 images (6 steps per epoch), for a separate process
PROCESS_ARGS = [
    "--model.init_args.net",
    "tinynet",
    "--data.init_args.train_size",
    "200",
    "--data.init_args.batch_size",
    "32",
    *QUIET_TRAINER,
]


def kdl_process(root: Path, *args: str, prelude: str = "") -> subprocess.Popen:
    """Start ``python -m kd_lightning.cli fit`` (or a script that patches something first) in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cli_args = [
        "fit",
        "--config",
        str(DIGITS_STUDENT),
        *PROCESS_ARGS,
        "--trainer.default_root_dir",
        str(root / "run"),
        *args,
    ]
    if prelude:
        script = prelude + "\nimport sys\nfrom kd_lightning.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", script, *cli_args]
    else:
        cmd = [sys.executable, "-m", "kd_lightning.cli", *cli_args]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until ``path`` exists while ``proc`` runs; a clear failure when it exits first or takes too long."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"kdl exited with {proc.returncode} before {path.name} appeared:\n{out}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ GANs
#: a tiny class-conditional GAN from recipes/fashion_mnist/cgan.yaml on 16 px digits
GAN_ARGS = [
    "--config",
    str(RECIPES / "fashion_mnist/cgan.yaml"),
    "--data",
    "DigitsDataModule",
    "--data.init_args.image_size",
    "16",
    "--data.init_args.batch_size",
    "32",
    "--data.init_args.augment",
    "false",
    "--model.init_args.g_ch",
    "8",
    "--model.init_args.d_ch",
    "8",
    "--model.init_args.z_dim",
    "16",
    "--model.init_args.diffaugment",
    "color,translation,cutout",
    "--model.init_args.ema_start",
    "0",
    *QUIET_TRAINER,
]


# ---------------------------------------------------------------------- cGAN-KD: tiny checkpoints, generate config
def save_module(model: torch.nn.Module, path: Path, cls: type) -> Path:
    """A checkpoint with the keys a kdl run writes (state_dict, hyper-parameters with the class path)."""
    hp = {
        **dict(model.hparams),
        "_class_path": f"{cls.__module__}.{cls.__name__}",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp, "pytorch-lightning_version": "2.5.0"}, path)
    return path


def tiny_gan(path: Path, regression: bool = False, size: int = 16) -> Path:
    """An untrained GAN whose images vary with z (its latent input layer is scaled up)."""
    torch.manual_seed(0)
    common = dict(z_dim=8, g_ch=4, d_ch=4, in_channels=1, image_size=size, mean=(0.3,), std=(0.4,))
    if regression:
        gan: Any = CcGAN(label_range=(-45.0, 45.0), **common)
    else:
        gan = ConditionalGAN(num_classes=10, shared_dim=8, **common)
    with torch.no_grad():
        for m in [*gan.generator.modules(), *gan.generator_ema.modules()]:
            if isinstance(m, torch.nn.Linear) and m.in_features == 8:
                m.weight.mul_(20.0)
    return save_module(gan, path, type(gan))


def tiny_teacher(path: Path, regression: bool = False, size: int = 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    if regression:
        m = ImageRegressor(net="tinynet", in_channels=1, image_size=size, label_range=(-45.0, 45.0))
        return save_module(m, path, ImageRegressor)
    m = ImageClassifier(net="tinynet", num_classes=10, in_channels=1, image_size=size, mean=(0.3,), std=(0.4,))
    return save_module(m, path, ImageClassifier)


def tiny_dr(path: Path, gan: Path, encoder: Path, regression: bool = False) -> Path:
    """A linear ratio model r = relu(1 + 0.6 z), z = the most varying encoder feature standardised on G's samples.

    Acceptance is then about one half and varies from image to image, as a trained one does.
    """
    torch.manual_seed(0)
    extra: dict[str, Any] = {"label_range": (-45.0, 45.0)} if regression else {"num_classes": 10}
    m = DensityRatioEstimator(
        generator=str(gan), encoder=str(encoder), mlp=[], dropout=0.0, in_channels=1, image_size=16, **extra
    )
    y = torch.arange(10).repeat_interleave(20) if not regression else torch.rand(200)
    h = m.model.features(m.generator.sample(y, seed=1))[0]
    k = int(h.std(0).argmax())
    lin = m.model.head.mlp[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, k] = 0.6 / float(h[:, k].std())
        lin.bias.fill_(1.0 - 0.6 * float(h[:, k].mean() / h[:, k].std()))
    ckpt: dict[str, Any] = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def cfg(parts: dict[str, Path], out: Path, **kw: Any) -> GenerateConfig:
    base = dict(
        generator=str(parts["gan"]),
        density_ratio=str(parts["dr"]),
        teacher=str(parts["teacher"]),
        out=str(out),
        per_class=12,
        burn_in=50,
        batch_size=8,
        shard_size=24,
        progress=False,
    )
    base.update(kw)
    return GenerateConfig(**base)  # type: ignore[arg-type]


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file directly in ``root``: name -> bytes (a store compared byte for byte)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def cgankd_parts(folder: Path) -> dict[str, Path]:
    """Tiny GAN, teacher and DR checkpoints, classification and regression (what ``kdl generate`` needs)."""
    out = {"gan": tiny_gan(folder / "gan.ckpt"), "teacher": tiny_teacher(folder / "teacher.ckpt")}
    out["dr"] = tiny_dr(folder / "dr.ckpt", out["gan"], out["teacher"])
    out["cc"] = tiny_gan(folder / "cc.ckpt", regression=True)
    out["reg_teacher"] = tiny_teacher(folder / "reg_teacher.ckpt", regression=True)
    out["cc_dr"] = tiny_dr(folder / "cc_dr.ckpt", out["cc"], out["reg_teacher"], regression=True)
    return out


# ---------------------------------------------------------------------- kdl report: a run folder
def fake_run(folder: Path, seed: int, val_acc: list[float], test_acc: float, losses: tuple[str, ...] = ()) -> Path:
    """A run folder as ``kdl fit`` + ``kdl test`` leave it: a fit version with curves, a test version."""
    config = {
        "seed_everything": seed,
        "model": {
            "class_path": "kd_lightning.methods.DistillModule" if losses else "kd_lightning.methods.ImageClassifier",
            "init_args": {
                "net": "resnet8",
                "kd_losses": [{"class_path": f"kd_lightning.losses.{n}"} for n in losses or []],
            },
        },
    }
    fit = folder / "lightning_logs" / "version_0"
    fit.mkdir(parents=True)
    (fit / "config.yaml").write_text(yaml.safe_dump(config))
    rows = ["epoch,step,train/loss_epoch,val/acc1,val/loss"]
    for epoch, acc in enumerate(val_acc):
        rows.append(f"{epoch},{10 * epoch + 9},,{acc},{1 - acc}")
        rows.append(f"{epoch},{10 * epoch + 9},0.5,,")
    (fit / "metrics.csv").write_text("\n".join(rows) + "\n")
    test = folder / "lightning_logs" / "version_1"
    test.mkdir(parents=True)
    (test / "config.yaml").write_text(yaml.safe_dump(config))
    (test / "metrics.csv").write_text(f"epoch,step,test/acc1,test/loss\n0,0,{test_acc},0.3\n")
    return folder
