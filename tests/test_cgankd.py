"""cGAN-KD's M1/M2 and the sample store: DR loss and fit, rejection sampling, filtering, store, DataModules."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from kd_lightning.data import AugmentedDataModule, DigitsDataModule, FilteredDataModule, GeneratedDataModule
from kd_lightning.methods.density_ratio import DensityRatioEstimator, RatioHead, load_density_ratio, sp_loss
from kd_lightning.sampling import (
    AcceptanceError,
    StoreError,
    accept,
    chunk_generator,
    class_cutoffs,
    estimate_max,
    global_cutoff,
    keep_mask,
    open_store,
    sha256_file,
)
from kd_lightning.sampling.generate import generate
from kd_lightning.sampling.generate import main as generate_main
from kd_lightning.teachers import FrozenTeacher
from tests.helpers import QUIET_TRAINER_KW, REPO, cfg, folder_bytes, tiny_dr, tiny_gan, tiny_teacher


# ---------------------------------------------------------------------- tiny checkpoints (tests/helpers.py)
# ---------------------------------------------------------------------- DR
def test_sp_loss_equals_a_plain_computation() -> None:
    real, fake, lam = [0.3, 2.0, 0.0], [0.1, 0.5, 1.5, 4.0], 0.3

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    expected = (
        sum(sig(f) * f for f in fake) / 4
        - sum(math.log1p(math.exp(f)) for f in fake) / 4
        - sum(sig(r) for r in real) / 3
        + lam * (sum(fake) / 4 - 1) ** 2
    )
    assert float(sp_loss(torch.tensor(real), torch.tensor(fake), lam)) == pytest.approx(expected, rel=1e-6)


def test_ratio_head_recovers_the_ratio_of_two_known_gaussians() -> None:
    """p_r = N(+-0.5, 1) for class 0/1 and p_g = N(0, 1): r(x|y) = exp(+-0.5 x - 0.125), within 15% on |x| <= 1."""
    torch.manual_seed(0)
    head = RatioHead(1, "classification", 2, [32, 32], 0.0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    for _ in range(600):
        y = torch.randint(0, 2, (256,))
        mu = torch.where(y == 0, 0.5, -0.5).unsqueeze(1)
        real, fake = torch.randn(256, 1) + mu, torch.randn(256, 1)
        loss = sp_loss(head(real, y), head(fake, y), 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    x = torch.linspace(-1.0, 1.0, 9).unsqueeze(1)
    for c, sign in ((0, 1.0), (1, -1.0)):
        with torch.no_grad():
            got = head(x, torch.full((9,), c))
        true = torch.exp(sign * 0.5 * x.squeeze(1) - 0.125)
        assert torch.allclose(got, true, rtol=0.15), (c, got, true)


def test_dr_module_trains_logs_and_its_checkpoint_loads_alone(parts: dict[str, Path], tmp_path: Path) -> None:
    import lightning as L

    model = DensityRatioEstimator(
        generator=str(parts["gan"]), encoder=str(parts["teacher"]), mlp=[16], num_classes=10, in_channels=1,
        image_size=16, mean=(0.3,), std=(0.4,),
    )  # fmt: skip
    dm = DigitsDataModule(batch_size=32, image_size=16, augment=False)
    head0 = [p.detach().clone() for p in model.model.head.parameters()]
    enc0 = [p.detach().clone() for p in model.model.encoder.parameters()]
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", enable_checkpointing=False,
        **QUIET_TRAINER_KW, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert {"val/loss", "val/ratio_real", "val/ratio_fake"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(a, b) for a, b in zip(head0, model.model.head.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(enc0, model.model.encoder.parameters()))  # frozen encoder
    assert int(model._cached.sum()) > 0  # real features cached by index
    trainer.save_checkpoint(tmp_path / "dr.ckpt")
    loaded = load_density_ratio(tmp_path / "dr.ckpt")
    assert loaded.encoder_sha256 == sha256_file(parts["teacher"])  # kdl generate reuses the encoder as teacher
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x, y), model.model(x, y), atol=1e-6)


# ---------------------------------------------------------------------- rejection sampling
def test_rejection_sampling_from_a_known_ratio_gives_the_target_distribution() -> None:
    """Proposals U(0, 1), ratio r(x) = 2x (target density 2x = Beta(2, 1)); M from a burn-in; KS test."""
    burn = chunk_generator(0, "u", "burnin")
    m = estimate_max(2 * torch.rand(5000, generator=burn))
    accepted = []
    for k in range(40):
        g = chunk_generator(0, "u", k)
        x = torch.rand(500, generator=g)
        mask, m = accept(2 * x, torch.rand(500, generator=g, dtype=torch.float64), m)
        accepted.append(x[mask])
    got = torch.cat(accepted).numpy()
    assert 0.45 < len(got) / 20000 < 0.55  # acceptance = E[r] / M = 1/2
    assert stats.kstest(got, stats.beta(2, 1).cdf).pvalue > 0.01
    assert stats.kstest(got, stats.uniform().cdf).pvalue < 1e-6  # and not the proposal
    again = torch.rand(500, generator=chunk_generator(0, "u", 3))
    assert torch.equal(again, torch.rand(500, generator=chunk_generator(0, "u", 3)))  # chunks are reproducible


def test_update_max_raises_m_before_deciding() -> None:
    r, u = torch.tensor([1.0, 4.0]), torch.tensor([0.3, 0.9], dtype=torch.float64)
    mask, m = accept(r, u, 2.0, update_max=True)
    assert m == 4.0 and mask.tolist() == [False, True]  # 1/4 < 0.3; 4/4 >= 0.9
    mask, m = accept(r, u, 2.0, update_max=False)
    assert m == 2.0 and mask.tolist() == [True, True]  # 1/2 >= 0.3; 4/2 > 1


def test_too_few_acceptances_end_with_the_class_and_the_rate(parts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AcceptanceError, match=r"class 0: accepted \d+ of \d+ proposals \(acceptance rate"):
        generate(cfg(parts, tmp_path / "s", per_class=200, max_proposals_factor=0.1))


# ---------------------------------------------------------------------- filtering
def test_quantile_cutoffs_are_exact_per_class_and_global() -> None:
    errors = np.array([*range(10), *[10.0 * i for i in range(5)]], dtype=np.float64)
    labels = np.array([0] * 10 + [1] * 5)
    cut = class_cutoffs(errors, labels, 0.9)
    assert cut[0] == pytest.approx(8.1)  # position 0.9 * 9 = 8.1 between 8 and 9
    assert cut[1] == pytest.approx(36.0)  # position 0.9 * 4 = 3.6 between 30 and 40
    kept = keep_mask(errors, labels, cut)
    assert kept.tolist() == [True] * 9 + [False] + [True] * 4 + [False]
    g = global_cutoff(errors, 0.7)
    assert g == pytest.approx(np.sort(errors)[9] + 0.8 * (np.sort(errors)[10] - np.sort(errors)[9]))
    assert keep_mask(errors, labels, g).sum() == 10


# ---------------------------------------------------------------------- generate and the store
def test_classification_store_holds_consistent_samples_and_report(parts: dict[str, Path], tmp_path: Path) -> None:
    store, _ = generate(cfg(parts, tmp_path / "s", keep_rejected=True))
    table = store.table()
    acc = table["accepted"].astype(bool)
    labels = table["label"]
    assert np.bincount(labels[acc], minlength=10).tolist() == [12] * 10
    assert (~acc).any()  # the rejected proposals are kept for comparisons
    # the stored teacher outputs are the teacher's on the stored images (padded the same way)
    images = torch.from_numpy(store.load_images()).float() / 255
    teacher = FrozenTeacher.from_checkpoint(parts["teacher"])
    assert torch.allclose(teacher(images), torch.from_numpy(table["teacher"]), atol=1e-4)
    # the filter keeps, per class, the accepted samples whose CE is at most that class's 0.9-quantile
    err = table["error"].astype(np.float64)
    for c in range(10):
        e = err[acc & (labels == c)]
        kept_c = table["kept"][acc & (labels == c)]
        assert kept_c.tolist() == (e <= np.quantile(e, 0.9)).tolist()
    assert not table["kept"][~acc].any()
    assert (table["final_label"] == labels).all() and not table["replaced"].any()
    rep = store.report
    agree = table["teacher"].argmax(1) == labels
    assert rep["label_consistency_before"] == pytest.approx(agree[acc].mean())
    assert rep["label_consistency_after"] == pytest.approx(agree[table["kept"].astype(bool)].mean())
    assert rep["units"]["class-3"]["accepted"] == 12
    assert (store.root / "filter_hist.png").read_bytes().startswith(b"\x89PNG")


def test_regression_store_filters_globally_and_replaces_labels(parts: dict[str, Path], tmp_path: Path) -> None:
    c = cfg(
        parts, tmp_path / "r", generator=str(parts["cc"]), density_ratio=str(parts["cc_dr"]),
        teacher=str(parts["reg_teacher"]), per_class=None, per_value=10, label_values=[0.0, 0.5, 1.0], kappa=0.05,
        vicinity_check=False,
    )  # fmt: skip
    store, _ = generate(c)
    t = store.table()
    assert store.settings["rho"] == 0.7 and store.settings["replace"] is True
    assert sorted(np.unique(t["label"]).tolist()) == [0.0, 0.5, 1.0]
    assert np.all(np.abs(t["gen_label"] - t["label"]) <= 0.05 + 1e-6)  # proposals from the vicinity
    cut = np.quantile(t["error"].astype(np.float64), 0.7)
    assert t["kept"].tolist() == (t["error"] <= cut).tolist()
    assert (t["replaced"] == t["kept"]).all()
    pred = np.clip(t["teacher"].reshape(-1), 0, 1)
    assert np.allclose(t["final_label"][t["kept"]], pred[t["kept"]])
    assert np.allclose(t["final_label"][~t["kept"]], t["label"][~t["kept"]])
    assert store.report["teacher_mae_after"] <= store.report["teacher_mae_before"]


@pytest.mark.slow  # a subprocess killed mid-run (~1 min on a loaded 2-core machine)
def test_killed_generation_resumes_to_identical_bytes(parts: dict[str, Path], tmp_path: Path) -> None:
    args = [
        f"--{k}={v}"
        for k, v in dict(generator=parts["gan"], density_ratio=parts["dr"], teacher=parts["teacher"]).items()
    ]
    args += ["--per_class=12", "--burn_in=20", "--batch_size=4", "--shard_size=4", "--progress=false"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert generate_main([*args, f"--out={whole}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = "import sys; from kd_lightning.sampling.generate import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, f"--out={killed}"], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            manifest = killed / "manifest.json"
            if manifest.is_file() and len(json.loads(manifest.read_text() or "{}").get("shards", [])) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((killed / "manifest.json").read_text())
    assert not state["finished"], "the run ended before it could be killed"
    assert generate_main([*args, f"--out={killed}"]) == 0  # resume
    assert folder_bytes(killed) == folder_bytes(whole)


def test_mismatched_store_is_refused_and_corrupt_shards_are_named(parts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    generate(cfg(parts, out))
    with pytest.raises(StoreError, match=r"rho: store=0.9 now=0.8"):
        generate(cfg(parts, out, rho=0.8))
    other = tiny_teacher(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(StoreError, match=r"teacher_sha256: store="):
        generate(cfg(parts, out, teacher=str(other)))
    shard = out / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00002.bin is corrupt"):
        open_store(out).load_images()
    assert generate_main([f"--generator={parts['gan']}", f"--out={tmp_path / 'x'}", "--per_clas=3"]) == 2  # unknown key


# ---------------------------------------------------------------------- DataModules
@pytest.fixture(scope="module")
def digit_store(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    generate(cfg(parts, out, per_class=6, keep_rejected=True))
    return out


def test_augmented_datamodule_keeps_indices_unique_and_evaluation_real(digit_store: Path) -> None:
    real = DigitsDataModule(batch_size=32, image_size=16, augment=False)
    dm = AugmentedDataModule(real, str(digit_store))
    dm.setup("fit")
    dm.setup("test")
    n_kept = int(open_store(digit_store).table()["kept"].sum())
    assert dm.n_fake == n_kept and dm.n_real == len(real.train_dataset)
    indices = [int(i) for b in dm.train_dataloader() for i in b["index"]]
    assert len(indices) == len(set(indices)) == dm.n_real + dm.n_fake - (dm.n_real + dm.n_fake) % 32
    assert max(indices) < dm.num_train_indices
    fake_images = torch.stack([dm.train_dataset.datasets[1][i]["image"] for i in range(dm.n_fake)])
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert loader.dataset in (real.val_dataset, real.test_dataset)
        for b in loader:
            same = (b["image"].flatten(1)[:, None] == fake_images.flatten(1)[None]).all(-1)
            assert not same.any()  # no fake image reaches validation or test
    share = AugmentedDataModule(real, str(digit_store), fake_share=0.25)
    share.setup("fit")
    batches = list(share.train_dataloader())
    assert all(int((b["index"] >= share.num_train_indices - share.n_fake).sum()) == 8 for b in batches)


def test_augmented_fakes_get_padding_for_their_own_size_and_the_facts_stay_the_real_ones(digit_store: Path) -> None:
    real = DigitsDataModule(batch_size=16, image_size=20, augment=False)  # digits are 8 px, the store's 16 px
    dm = AugmentedDataModule(real, str(digit_store))
    dm.setup("fit")
    assert dm.native_size == real.native_size == 8 and dm.image_size == 20
    fake = dm.train_dataset.datasets[1]
    stored = fake.images[0].float() / 255
    assert torch.allclose(fake[0]["image"][:, 2:18, 2:18], stored) and fake[0]["image"][:, :2].abs().sum() == 0
    assert dm.train_dataset[0]["image"].shape == fake[0]["image"].shape == (1, 20, 20)


def test_filtered_and_generated_datamodules(parts: dict[str, Path], digit_store: Path) -> None:
    t = open_store(digit_store).table()
    dm = FilteredDataModule(str(digit_store), DigitsDataModule(batch_size=16, image_size=16))
    dm.setup("fit")
    assert len(dm.train_dataset) == int(t["kept"].sum())
    assert next(iter(dm.val_dataloader()))["image"].shape[-1] == 16
    every = FilteredDataModule(str(digit_store), filtered=False)
    every.setup("fit")
    assert len(every.train_dataset) == int(t["accepted"].sum())
    gen = GeneratedDataModule(str(parts["gan"]), DigitsDataModule(batch_size=16, image_size=16), per_class=3)
    gen.setup("fit")
    b = next(iter(gen.train_dataloader()))
    assert len(gen.train_dataset) == 30 and b["image"].shape[1:] == (1, 16, 16)


def test_distill_module_takes_the_stored_teacher_outputs(
    parts: dict[str, Path], digit_store: Path, tmp_path: Path
) -> None:
    import lightning as L

    from kd_lightning.losses import BLKD
    from kd_lightning.methods import DistillModule

    real = DigitsDataModule(batch_size=64, image_size=16, augment=False)
    dm = AugmentedDataModule(real, str(digit_store))
    model = DistillModule(
        teacher=str(parts["teacher"]), net="tinynet", kd_losses=[BLKD(T=4, weight=0.9)], cache_teacher=True,
        num_classes=10, in_channels=1, image_size=16, mean=(0.3,), std=(0.4,),
    )  # fmt: skip
    seen: list[int] = []
    original = model.teacher_outputs

    def counting(x: torch.Tensor) -> Any:
        seen.append(len(x))
        return original(x)

    model.teacher_outputs = counting  # type: ignore[method-assign]
    trainer = L.Trainer(
        max_epochs=1, limit_val_batches=0, accelerator="cpu", enable_checkpointing=False,
        **QUIET_TRAINER_KW, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.prefilled == dm.n_fake > 0
    batches = len(dm.train_dataloader())
    assert sum(seen) <= batches * 64 - dm.n_fake + 64  # the teacher ran on real images only
    table = open_store(digit_store).table()
    rows = np.nonzero(table["kept"])[0]
    assert torch.allclose(
        model.teacher_cache.read(torch.tensor([dm.num_train_indices - dm.n_fake]), "logits")[0],
        torch.from_numpy(table["teacher"][rows[0]]),
    )


# ---------------------------------------------------------------------- the per-stage recipes
SETTINGS = {  # setting -> (GAN stage, image size of the GAN, of the teacher, regression, data-root option paths)
    "digits": ("cgan", 8, 16, False),  # the toy GAN learns on the native 8 px digits
    "fashion_mnist": ("cgan", 28, 32, False),
    "rotated": ("ccgan", 28, 32, True),
}


def root_options(setting: str, fake_root: Path, augmented: bool) -> list[str]:
    if setting == "digits":
        return []
    key = {
        ("fashion_mnist", False): "data.init_args.root",
        ("fashion_mnist", True): "data.init_args.datamodule.init_args.root",
        ("rotated", False): "data.init_args.datamodule.init_args.root",
        ("rotated", True): "data.init_args.datamodule.init_args.datamodule.init_args.root",
    }[(setting, augmented)]
    return [f"--{key}", str(fake_root)]


@pytest.mark.parametrize(
    "setting",
    [
        "digits",
        pytest.param("fashion_mnist", marks=pytest.mark.slow),
        pytest.param("rotated", marks=pytest.mark.slow),
    ],
)
def test_every_cgankd_stage_recipe_runs_in_order(setting: str, kdl, tmp_path: Path) -> None:
    """Each stage's recipe under fast_dev_run (generate on a few samples), later stages fed tiny checkpoints."""
    from tests.helpers import make_fake_mnist

    folder = REPO / "recipes" / "cgankd" / setting
    gan_stage, gan_size, t_size, regression = SETTINGS[setting]
    names = {p.name for p in folder.glob("*.yaml")} - {"pipeline.yaml"}  # the chain itself: tests/test_pipeline.py
    kd_student = "student_cgankd_fitnet.yaml" if regression else "student_cgankd_blkd.yaml"
    kd_baseline = {"digits": [], "fashion_mnist": ["blkd.yaml"], "rotated": ["fitnet.yaml"]}[setting]  # real data only
    names -= {p.name for p in folder.glob("*.yaml") if "stages" in (yaml.safe_load(p.read_text()) or {})}  # pipelines
    oracle = ["oracle.yaml", "cgan_long.yaml"] if setting == "fashion_mnist" else []  # cgan_long stacks on cgan.yaml
    assert names == {"teacher.yaml", "student.yaml", f"{gan_stage}.yaml", "dr.yaml", "generate.yaml",
                     "student_cgankd.yaml", kd_student, *kd_baseline, *oracle}  # fmt: skip
    fake = make_fake_mnist(tmp_path / "fmnist") if setting != "digits" else tmp_path
    fast = ["--trainer.fast_dev_run", "1"]
    for stage in ("teacher", "student", gan_stage):
        assert kdl("fit", "--config", str(folder / f"{stage}.yaml"), *fast, *root_options(setting, fake, False)) == 0
    gan = tiny_gan(tmp_path / "gan.ckpt", regression=regression, size=gan_size)
    teacher = tiny_teacher(tmp_path / "teacher.ckpt", regression=regression, size=t_size)
    for recipe in kd_baseline:
        args = ["--model.init_args.teacher", str(teacher), *fast, *root_options(setting, fake, False)]
        assert kdl("fit", "--config", str(folder / recipe), *args) == 0
    dr_args = ["--model.init_args.generator", str(gan), "--model.init_args.encoder", str(teacher)]
    assert kdl("fit", "--config", str(folder / "dr.yaml"), *fast, *dr_args, *root_options(setting, fake, False)) == 0
    dr = tiny_dr(tmp_path / "dr.ckpt", gan, teacher, regression=regression)
    store = tmp_path / "store"
    counts = (
        ["--per_value=3", "--label_values=[0.2,0.8]", "--vicinity_check=false"] if regression else ["--per_class=3"]
    )
    gen_args = [f"--generator={gan}", f"--density_ratio={dr}", f"--teacher={teacher}", f"--out={store}"]
    assert generate_main(["--config", str(folder / "generate.yaml"), *gen_args, *counts, "--burn_in=20",
                          "--progress=false"]) == 0  # fmt: skip
    if oracle:  # the oracle store from the fake files' held-out images (a subset of 20 leaves the rest)
        from kd_lightning.sampling.oracle import main as oracle_main

        oracle_args = ["--config", str(folder / "oracle.yaml"), f"--teacher={teacher}", f"--out={tmp_path / 'oracle'}"]
        oracle_args += ["--per_class=1", "--data.init_args.train_size=20", f"--data.init_args.root={fake}"]
        assert oracle_main(oracle_args) == 0
    for recipe in ("student_cgankd.yaml", kd_student):
        extra = ["--model.init_args.teacher", str(teacher)] if recipe == kd_student else []
        args = ["--data.init_args.store", str(store), "--model.init_args.net_weights", "null", *extra]
        if setting == "fashion_mnist":  # the recipe reads 0.5 x D^r fakes; the tiny store holds fewer
            args += ["--data.init_args.fake_ratio", "null"]
        assert kdl("fit", "--config", str(folder / recipe), *fast, *args, *root_options(setting, fake, True)) == 0
