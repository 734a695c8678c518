"""The settings of ``kdl generate`` (:class:`GenerateConfig`) and the checks that need no checkpoint.

What each option means and does lives here; :mod:`kd_lightning.sampling.generate` loads the checkpoints, checks
what depends on them (the GAN's task: classification or regression) and writes the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_lightning.errors import ConfigError
from kd_lightning.sampling.filtering import check_rho


@dataclass
class GenerateConfig:
    """Settings of ``kdl generate``.

    Args:
        generator: GAN checkpoint (ConditionalGAN or CcGAN, written by kdl fit).
        out: the store folder (created; an existing store with the same settings is resumed).
        density_ratio: DensityRatioEstimator checkpoint; ``None`` = no subsampling.
        teacher: the filtering teacher (kdl classifier/regressor checkpoint); ``None`` = no filtering.
        per_class: samples accepted per class (classification; N^g / C of Algorithm 1).
        label_values: regression: the label grid, normalised to [0, 1] (default: ``n_label_values``
            evenly spaced values).
        n_label_values: regression: size of the evenly spaced grid when ``label_values`` is not given.
        per_value: regression: samples accepted per grid value.
        rho: filtering quantile (default 0.9 classification, 0.7 regression).
        subsample: cDR-RS on (default: on when ``density_ratio`` is given).
        filter: M2's filtering on (needs a teacher).
        replace: M2's replacement on (default: regression only, as the paper).
        burn_in: proposals per unit whose largest ratio is M (official code: 5,000).
        update_max: raise M to every chunk's largest ratio before deciding (official code); false =
            M fixed after the burn-in (ratios above M are then always accepted).
        kappa: regression: proposals are generated at labels uniform in [y - kappa, y + kappa] and
            judged at y (official code's vicinity); 0 = at y.
        vicinity_check: regression with kappa > 0: reject proposals whose label, predicted by the DR
            encoder (when it is a regressor), falls outside the vicinity.
        max_proposals_factor: a unit fails with a clear error after ``factor x count`` proposals.
        keep_rejected: also store rejected proposals (flag ``accepted`` false): the raw GAN samples
            stay available for comparisons; DataModules use accepted samples only.
        seed: seed of every random number (latent codes, labels, acceptance draws).
        batch_size: proposals per chunk (part of the settings: it decides the samples).
        forward_batch: deprecated and ignored (a warning says so). Every network pass runs on micro-batches of
            :data:`~kd_lightning.sampling.generate.MICRO_BATCH` (100) images, whatever this says: a store's bytes
            depend only on its settings and seed, although BLAS libraries pick other kernels, and so other
            rounding, for other batch sizes
            (MKL's AVX2 GEMMs do: AMD hosts use them). 100 was this option's default and its fastest value on CPU
            (docs/performance.md), so stores written with the default are resumed bit for bit.
        shard_size: samples per shard (at least; a shard ends at a chunk boundary).
        ema: sample from the EMA generator.
        teacher_image_size: side the teacher takes (default: its checkpoint's ``image_size``).
        device: where to run (cpu, cuda, cuda:1, ...).
        fast_inference: fold BatchNorm into the convolutions of the frozen nets (DR encoder, teacher,
            the generator's blocks) and run the generator channels-last. Faster on CPU (see
            docs/performance.md), but float outputs differ at the rounding level (ratios, teacher
            outputs, rarely a uint8 pixel or an acceptance), so the store's bytes are not those of a run
            without it: it is part of the settings.
        compile: with ``fast_inference``, also compile the generator copy and the folded frozen nets with
            TorchInductor (freezing: convolutions fused with their ReLU/residual add). About 1.12x more
            proposals per second than ``fast_inference`` alone on CPU, after 5-10 s of compilation
            (docs/performance.md); worth it for stores of tens of thousands of proposals. Outputs differ
            from ``fast_inference`` alone at the rounding level again, so it is part of the settings too.
            On a CPU it needs a C++ compiler.
        progress: show a progress bar (accepted / needed and the acceptance rate).
    """

    generator: str
    out: str
    density_ratio: str | None = None
    teacher: str | None = None
    per_class: int | None = None
    label_values: list[float] | None = None
    n_label_values: int = 10
    per_value: int | None = None
    rho: float | None = None
    subsample: bool | None = None
    filter: bool = True
    replace: bool | None = None
    burn_in: int = 5000
    update_max: bool = False
    kappa: float = 0.0
    vicinity_check: bool = True
    max_proposals_factor: float = 200.0
    keep_rejected: bool = False
    seed: int = 0
    batch_size: int = 500
    forward_batch: int | None = None
    shard_size: int = 5000
    ema: bool = True
    teacher_image_size: int | None = None
    device: str = "cpu"
    fast_inference: bool = False
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """The checks that need no checkpoint (those that depend on the GAN's task are :class:`Generation`'s)."""
        for name in ("batch_size", "shard_size", "burn_in"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.subsample and self.density_ratio is None:
            raise ConfigError("subsample=true needs density_ratio=<DensityRatioEstimator checkpoint>")
        if self.filter and self.teacher is None:
            raise ConfigError("filter=true needs teacher=<checkpoint>; set filter false to keep every sample")
        if self.replace and self.teacher is None:
            raise ConfigError("replace=true needs teacher=<checkpoint>")
        if self.rho is not None:
            check_rho(self.rho)
        if self.kappa < 0:
            raise ConfigError(f"kappa={self.kappa}; expected a value >= 0")
        if self.compile and not self.fast_inference:
            raise ConfigError("compile=true compiles the fast_inference copies of the nets; set fast_inference=true")


__all__ = ["GenerateConfig"]
