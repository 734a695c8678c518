"""A quality gate on MEKD's deprivatization generator: do the teacher's answers on G(z) cover every class?

MEKD's second stage only sees G(z); when the generator has collapsed onto a few classes, every loss trained on
G(z) stays near chance (issue 29: 36 % of the answers in one class, three classes at ~0.5 %). The gate asks the
black-box teacher about ``samples`` images G(z) (fixed codes, ``seed``) and measures

- ``min_class_share``: the smallest share of the answers any class gets (answer = top class);
- ``entropy``: the entropy of that class histogram divided by log(classes) (1 = perfectly even);
- ``mean_confidence``: the teacher's mean top probability (soft answers only; NaN for hard answers).

It also records, not gated, what MEKD's hard answers turn into: the teacher's answer on G(s * e_c / tau) for every
class c (e_c the one-hot vector, ``hard_scales`` s; s = 1 is the official code's input for a hard answer), and
how many of the classes come back as themselves (``onehot_self``) and how many distinct answers there are.

It passes when ``min_class_share >= min_class_share``, ``entropy >= min_entropy`` and, if set,
``mean_confidence >= min_confidence``. The gate's queries are paid like any other: they go through the stage's
client, its journal and budget. :class:`GeneratorGate` runs it at the end of ``kdl test`` on a deprivatization
checkpoint (the pipeline's gate stage) and, with ``at_fit_end``, at the end of the deprivatization fit; it logs
``test/gate_*`` (read by ``kdl report``), writes ``<default_root_dir>/gate.json`` and stops the run with
:class:`GateFailed` naming the failing numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.fileio import atomic_write_bytes


class GateFailed(KDLError):
    """The generator failed the quality gate (the message names the failing numbers)."""


class _Client(Protocol):
    def query(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GateResult:
    """The gate's numbers and verdict."""

    samples: int
    class_shares: list[float]
    min_class_share: float
    entropy: float
    mean_confidence: float
    passed: bool
    failures: list[str]

    def message(self) -> str:
        shares = " ".join(f"{s:.3f}" for s in self.class_shares)
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (
            f"generator gate {verdict} (teacher's answers on {self.samples} images G(z): min class share "
            f"{self.min_class_share:.3f}, normalised entropy {self.entropy:.3f}, mean top probability "
            f"{self.mean_confidence:.3f}; class shares {shares})"
        )


def gate_numbers(
    answers: torch.Tensor,
    num_classes: int,
    min_class_share: float = 0.03,
    min_entropy: float = 0.95,
    min_confidence: float | None = None,
) -> GateResult:
    """The gate on a teacher's answers: ``N x C`` probabilities (soft) or ``N`` class ids (hard)."""
    soft = answers.dim() == 2
    classes = answers.argmax(-1) if soft else answers.long()
    counts = torch.bincount(classes.flatten().cpu(), minlength=num_classes)[:num_classes].double()
    shares = counts / counts.sum().clamp_min(1)
    nz = shares[shares > 0]
    entropy = max(0.0, float(-(nz * nz.log()).sum() / math.log(num_classes))) if num_classes > 1 else 1.0
    confidence = float(answers.float().max(-1).values.mean()) if soft else float("nan")
    failures = []
    if float(shares.min()) < min_class_share:
        low = [f"class {c}: {float(shares[c]):.3f}" for c in range(num_classes) if shares[c] < min_class_share]
        failures.append(f"class share below {min_class_share} ({', '.join(low)})")
    if entropy < min_entropy:
        failures.append(f"normalised entropy {entropy:.3f} < {min_entropy}")
    if min_confidence is not None and not confidence >= min_confidence:
        failures.append(f"mean top probability {confidence:.3f} < {min_confidence}")
    return GateResult(
        samples=len(classes),
        class_shares=[round(float(s), 6) for s in shares],
        min_class_share=float(shares.min()),
        entropy=entropy,
        mean_confidence=confidence,
        passed=not failures,
        failures=failures,
    )


@torch.no_grad()
def run_gate(
    generator: torch.nn.Module,
    client: _Client,
    z_dim: int,
    num_classes: int,
    samples: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    **thresholds: Any,
) -> GateResult:
    """Ask ``client`` about ``samples`` images G(z), z ~ N(0, I) from ``seed``, and apply :func:`gate_numbers`."""
    z = torch.randn(samples, z_dim, generator=torch.Generator().manual_seed(seed))
    answers = []
    was_training = generator.training
    generator.eval()
    try:
        for chunk in z.split(batch_size):
            x = ((generator(chunk.to(device)) + 1) / 2).clamp(0, 1)
            answers.append(client.query(x).cpu())
    finally:
        generator.train(was_training)
    return gate_numbers(torch.cat(answers), num_classes, **thresholds)


@torch.no_grad()
def onehot_answers(
    generator: torch.nn.Module,
    client: _Client,
    num_classes: int,
    tau: float,
    scales: list[float],
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """The teacher's class for G(s * e_c / tau), every class c, per scale s: ``{str(s): {labels, self, distinct}}``."""
    out = {}
    was_training = generator.training
    generator.eval()
    try:
        for s in scales:
            z = torch.eye(num_classes, device=device) * (s / tau)
            answers = client.query(((generator(z) + 1) / 2).clamp(0, 1)).cpu()
            labels = answers.argmax(-1) if answers.dim() == 2 else answers.long()
            out[str(float(s))] = {
                "labels": labels.tolist(),
                "self": int((labels == torch.arange(num_classes)).sum()),
                "distinct": int(labels.unique().numel()),
            }
    finally:
        generator.train(was_training)
    return out


class GeneratorGate(L.Callback):
    """Run the generator gate on a :class:`~kd_lightning.methods.MEKDDeprivatization` (see the module doc).

    Args:
        samples: images G(z) to ask the teacher about (paid queries, counted in the stage's budget).
        min_class_share: every class must get at least this share of the answers (0 disables).
        min_entropy: normalised entropy of the class histogram must reach this (0 disables).
        min_confidence: mean top probability must reach this (``None``: reported, not gated).
        ema: gate the EMA generator (what MEKD uses by default) or the raw one.
        seed: seed of the latent codes (the same codes every time: a rerun reads them from the journal).
        tau: MEKD's temperature (the generator input for a hard answer c is ``s * e_c / tau``).
        hard_scales: the scales s of that measurement.
        at_fit_end: also gate at the end of a fit (the fit then ends with an error when it fails; its checkpoints
            are written first).
    """

    def __init__(
        self,
        samples: int = 1000,
        min_class_share: float = 0.03,
        min_entropy: float = 0.95,
        min_confidence: float | None = None,
        ema: bool = True,
        seed: int = 0,
        tau: float = 5.0,
        hard_scales: list[float] | None = None,
        at_fit_end: bool = False,
    ) -> None:
        if samples < 1 or not 0 <= min_class_share <= 1 or not 0 <= min_entropy <= 1:
            raise ConfigError(
                f"samples={samples}, min_class_share={min_class_share}, min_entropy={min_entropy}; expected "
                "samples >= 1 and thresholds in [0, 1]"
            )
        self.samples, self.seed, self.ema, self.at_fit_end = samples, seed, ema, at_fit_end
        self.thresholds: dict[str, Any] = dict(
            min_class_share=min_class_share, min_entropy=min_entropy, min_confidence=min_confidence
        )
        self.tau, self.hard_scales = tau, list(hard_scales if hard_scales is not None else [1.0])
        self.result: GateResult | None = None
        self.onehot: dict[str, Any] = {}

    def _gate(self, trainer: L.Trainer, module: L.LightningModule) -> GateResult:
        from kd_lightning.loading import is_gan

        link = getattr(module, "link", None)
        if not is_gan(module) or link is None or link.client is None:
            raise ConfigError(
                f"GeneratorGate needs a MEKDDeprivatization with a connected teacher, got {type(module).__name__} "
                "(with alpha > 0, or run it under kdl test)"
            )
        generator = module.sampler_generator(ema=self.ema)
        hp = module.hparams
        result = run_gate(
            generator, link.client, int(hp.z_dim), int(hp.num_classes), self.samples, self.seed,
            device=module.device, **self.thresholds,
        )  # fmt: skip
        self.result = result
        self.onehot = onehot_answers(
            generator, link.client, int(hp.num_classes), self.tau, self.hard_scales, module.device
        )
        root = Path(trainer.default_root_dir)
        report = {**asdict(result), "thresholds": self.thresholds, "ema": self.ema, "seed": self.seed}
        report["onehot"] = self.onehot
        atomic_write_bytes(root / "gate.json", json.dumps(report, indent=2).encode())
        print(result.message())
        return result

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self._gate(trainer, pl_module)
        for key in ("min_class_share", "entropy", "mean_confidence"):
            pl_module.log(f"test/gate_{key}", float(getattr(result, key)))
        pl_module.log("test/gate_passed", float(result.passed))
        if "1.0" in self.onehot:
            pl_module.log("test/gate_onehot_self", float(self.onehot["1.0"]["self"]))
        if not result.passed:
            raise GateFailed(result.message() + f"; numbers in {Path(trainer.default_root_dir) / 'gate.json'}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and trainer.global_rank == 0:
            result = self._gate(trainer, pl_module)
            if not result.passed:
                raise GateFailed(result.message())


__all__ = ["GateFailed", "GateResult", "GeneratorGate", "gate_numbers", "onehot_answers", "run_gate"]
