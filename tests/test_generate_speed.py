"""kdl generate's speed options: forward passes split inside a chunk give the same bytes; ``fast_inference``
(folded BatchNorms, channels-last generator) is a setting of its own and stays within rounding of the default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.sampling.generate import Generation, generate
from kd_lightning.sampling.store import StoreError
from kd_lightning.teachers import FrozenTeacher
from tests.helpers import cfg, folder_bytes


def stores_by_forward_batch(parts: dict[str, Path], out: Path, batches: tuple[int, ...]) -> dict[str, object]:
    """Stores written with each forward_batch: the SHA-256 of each one's files, and whether each run warned."""
    import hashlib
    import warnings

    digests, warned = {}, {}
    for fb in batches:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            generate(cfg(parts, out / f"fb{fb}", forward_batch=fb))
        warned[str(fb)] = any("forward_batch=" in str(w.message) and "ignored" in str(w.message) for w in seen)
        digests[str(fb)] = {n: hashlib.sha256(b).hexdigest() for n, b in folder_bytes(out / f"fb{fb}").items()}
    return {"digests": digests, "warned": warned}


def test_forward_batch_does_not_change_the_store(parts: dict[str, Path], tmp_path: Path) -> None:
    found = stores_by_forward_batch(parts, tmp_path, (3, 100))  # an uneven split, one larger than the chunk
    stores = found["digests"]
    assert stores["3"] == stores["100"]
    assert all(found["warned"].values())  # the option is ignored, and says so


def test_forward_batch_does_not_change_the_store_with_mkl_avx2_kernels(parts: dict[str, Path], tmp_path: Path) -> None:
    """MKL's AVX2 kernels (the ones AMD hosts get) round a GEMM's rows differently for different row counts (the
    generator's first Linear, the small convolutions torch runs as GEMMs): a store must not depend on the split."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys, torch; from pathlib import Path; torch.set_num_threads(1)\n"
        "from tests.test_generate_speed import stores_by_forward_batch\n"
        "parts = {k: Path(v) for k, v in json.loads(sys.argv[1]).items()}\n"
        "print(json.dumps(stores_by_forward_batch(parts, Path(sys.argv[2]), (3, 100))))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    args = [json.dumps({k: str(v) for k, v in parts.items()}), str(tmp_path)]
    done = subprocess.run(  # MKL reads the variable when it loads: a fresh interpreter
        [sys.executable, "-c", script, *args], env=env, cwd=root, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stores = json.loads(done.stdout.strip().splitlines()[-1])["digests"]
    assert stores["3"] == stores["100"]


def test_fast_inference_is_within_rounding_and_a_setting_of_its_own(
    parts: dict[str, Path],
    tmp_path: Path,
) -> None:
    plain = Generation(cfg(parts, tmp_path / "a"))
    fast = Generation(cfg(parts, tmp_path / "b", fast_inference=True))
    assert fast.run_gen is not fast.gen and fast.dr.encoder.fold_bn and fast.teacher.fold_bn
    # the generator as loaded is untouched (its BatchNorms are there; the folded copy is apart)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.gen.modules())
    assert fast.gen.state_dict().keys() == plain.gen.state_dict().keys()
    unit = plain.units[0]
    a, b = plain.propose(unit, 0, 64), fast.propose(unit, 0, 64)
    assert torch.equal(a["uniform"], b["uniform"])
    assert int((a["image"].int() - b["image"].int()).abs().max()) <= 1  # a rounding flip at most
    same = (a["image"] == b["image"]).flatten(1).all(1)
    assert same.float().mean() >= 0.9
    assert torch.allclose(a["ratio"][same], b["ratio"][same], rtol=1e-4, atol=1e-5)
    # a store written without it is not resumed with it (its bytes would differ)
    generate(cfg(parts, tmp_path / "s", per_class=2))
    with pytest.raises(StoreError, match="fast_inference"):
        generate(cfg(parts, tmp_path / "s", per_class=2, fast_inference=True))


def test_compile_is_within_rounding_of_fast_inference_and_a_setting_of_its_own(
    parts: dict[str, Path],
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="compile=true compiles the fast_inference copies"):
        Generation(cfg(parts, tmp_path / "x", compile=True))
    fast = Generation(cfg(parts, tmp_path / "a", fast_inference=True))
    comp = Generation(cfg(parts, tmp_path / "b", fast_inference=True, compile=True))
    assert comp.run_gen._compiled_call_impl is not None and fast.run_gen._compiled_call_impl is None
    assert comp.dr.encoder.compile_inference and not fast.dr.encoder.compile_inference
    assert comp.dr.encoder.inference_net()._compiled_call_impl is not None
    assert comp.dr.encoder.net._compiled_call_impl is None  # the loaded net (and its state_dict) is untouched
    unit = fast.units[0]
    a, b = fast.propose(unit, 0, 64), comp.propose(unit, 0, 64)
    assert torch.equal(a["uniform"], b["uniform"]) and torch.equal(a["label"], b["label"])
    assert int((a["image"].int() - b["image"].int()).abs().max()) <= 1
    same = (a["image"] == b["image"]).flatten(1).all(1)
    assert same.float().mean() >= 0.9
    assert torch.allclose(a["ratio"][same], b["ratio"][same], rtol=1e-4, atol=1e-5)
    assert torch.allclose(a["teacher"][same], b["teacher"][same], rtol=1e-4, atol=1e-4)
    generate(cfg(parts, tmp_path / "s", per_class=2, fast_inference=True))
    with pytest.raises(StoreError, match="compile"):
        generate(cfg(parts, tmp_path / "s", per_class=2, fast_inference=True, compile=True))


def test_frozen_teacher_compiles_only_a_folded_copy(parts: dict[str, Path]) -> None:
    teacher = FrozenTeacher.from_checkpoint(parts["teacher"])
    teacher.compile_inference = True
    with pytest.raises(ConfigError, match=r"compile_inference on .* needs fold_bn"):
        teacher.inference_net()
    teacher.fold_bn = True
    compiled = teacher.inference_net()
    assert compiled is not teacher.net and compiled._compiled_call_impl is not None
    assert teacher.net._compiled_call_impl is None
    teacher.compile_inference = False  # switching it off gives a plain folded copy again
    assert teacher.inference_net()._compiled_call_impl is None
