"""Sample grids of a finished store: ``kdl generate`` leaves them in ``<store>/grids/`` and names them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kd_lightning.callbacks.gan_quality import save_grid_png
from kd_lightning.sampling.generate import generate
from kd_lightning.sampling.generate import main as generate_main
from kd_lightning.sampling.grids import grid_image
from tests.helpers import cfg


def test_grid_rows_hold_the_first_samples_of_their_row_and_white_elsewhere() -> None:
    images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 1, 2, 2) + 1
    rows = np.array([0, 1, 0, 1, 0])
    mask = np.array([True, True, False, True, True])
    canvas = grid_image(images, rows, mask, n_rows=2, per_row=2)
    assert canvas.shape == (4, 4)
    assert (canvas[0:2, 0:2] == images[0, 0]).all() and (canvas[0:2, 2:4] == images[4, 0]).all()
    assert (canvas[2:4, 0:2] == images[1, 0]).all() and (canvas[2:4, 2:4] == images[3, 0]).all()
    assert (grid_image(images, rows, rows == 1, n_rows=2, per_row=3)[0:2] == 255).all()  # row 0: nothing selected


def test_generate_writes_a_grid_per_sample_kind_and_names_them(parts: dict[str, Path], tmp_path: Path, capsys) -> None:
    store, _ = generate(cfg(parts, tmp_path / "s", keep_rejected=True))
    grids = store.root / "grids"
    assert sorted(p.name for p in grids.iterdir()) == ["dropped.png", "kept.png", "rejected.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in grids.iterdir())
    # without keep_rejected there is no rejected grid; the command line names the grids it wrote
    args = [f"--generator={parts['gan']}", f"--density_ratio={parts['dr']}", f"--teacher={parts['teacher']}"]
    small = ["--per_class=6", "--burn_in=20", "--batch_size=8", "--shard_size=24", "--progress=false"]
    assert generate_main([*args, *small, f"--out={tmp_path / 't'}"]) == 0
    err = capsys.readouterr().err
    assert f"sample grids (one row per class or label bin): {tmp_path / 't' / 'grids' / 'dropped.png'}" in err
    assert sorted(p.name for p in (tmp_path / "t" / "grids").iterdir()) == ["dropped.png", "kept.png"]


def test_gan_grids_of_small_images_are_enlarged_by_whole_pixels(tmp_path: Path) -> None:
    from PIL import Image

    images = torch.rand(6, 1, 8, 8)
    save_grid_png(images, str(tmp_path / "g.png"), nrow=3)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    assert grid.shape == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2)  # 8 px -> 32 px blocks, 2 px padding
    first = grid[2:34, 2:34]
    expected = np.kron((images[0, 0].numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8), np.ones((4, 4), np.uint8))
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1
    save_grid_png(torch.rand(2, 3, 32, 32), str(tmp_path / "h.png"), nrow=2)  # 32 px and more: as they are
    assert Image.open(tmp_path / "h.png").size == (2 * 32 + 3 * 2, 32 + 2 * 2)
