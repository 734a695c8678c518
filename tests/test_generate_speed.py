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
from tests.helpers import cfg, cgankd_parts, folder_bytes


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return cgankd_parts(tmp_path_factory.mktemp("cgankd"))


def test_forward_batch_does_not_change_the_store(parts: dict[str, Path], tmp_path: Path) -> None:
    stores = {}
    for fb in (8, 3, 100):  # one pass per chunk (as before), uneven splits, larger than the chunk
        out = tmp_path / f"fb{fb}"
        generate(cfg(parts, out, forward_batch=fb))
        stores[fb] = folder_bytes(out)
    assert stores[3] == stores[8] == stores[100]


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
