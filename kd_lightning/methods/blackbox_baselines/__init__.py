"""The methods MEKD's Table 1 compares with, on the black-box teacher protocol of :class:`~kd_lightning.methods.MEKD`.

Every one is a :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent` (or, DAFL, a white-box sibling)
trained by ``kdl fit`` on a :class:`~kd_lightning.data.QueryPoolDataModule`; every image sent to the teacher goes
through its :class:`~kd_lightning.teachers.client.QueryClient`, so it is counted, journalled, paid once (a resumed
run reads its answers from the journal) and refused past ``query_budget``. ``queries/spent`` is logged at every
validation, beside ``val/acc1``, so accuracy against queries can be read from the run's metrics.

- :class:`BlackBoxKD` (``kd.py``) — KD on soft answers, hard-label KD, ML (Ba & Caruana) and DKD, on queried
  local images or G(z).
- :class:`KN` — Knockoff Nets (Orekondy et al. 2019): a transfer set of local images, then KD on it; drawn at
  random and queried up front (``policy: random``, MEKD's), or chosen by the paper's gradient bandit over the pool's
  classes while the student learns online (``policy: adaptive``).
- :class:`AL` — adversarial learning (Wang et al. 2018): KD plus a discriminator on logits.
- :class:`DAFL` — data-free learning (Chen et al. 2019): a generator driven by the teacher's outputs *and
  features*; white-box, as in MEKD's table (it needs the teacher's gradients).
- :class:`AM` — Active Mixup (Wang et al. 2020): rounds of mixed image pairs chosen by the student's uncertainty.
- :class:`DB3KD` — decision-based black-box KD (Wang 2021): soft labels from distances to the teacher's decision
  boundaries, found with hard answers only; hundreds of queries per sample.

One module per method family (``knockoff``, ``adversarial``, ``dafl``, ``active_mixup``, ``db3kd``), what they
share in ``base``; every name is importable from this package.

docs/mekd.md lists, per method, what it queries and each difference from the MEKD code's baseline script.
"""

from __future__ import annotations

from kd_lightning.methods.blackbox_baselines.active_mixup import AM
from kd_lightning.methods.blackbox_baselines.adversarial import (
    AL,
    LogitDiscriminator,
    default_discriminator_optimizer,
)
from kd_lightning.methods.blackbox_baselines.dafl import DAFL, default_generator_optimizer
from kd_lightning.methods.blackbox_baselines.db3kd import DB3KD
from kd_lightning.methods.blackbox_baselines.kd import BlackBoxKD
from kd_lightning.methods.blackbox_baselines.knockoff import KN, random_crop

__all__ = [
    "AL",
    "AM",
    "DAFL",
    "DB3KD",
    "KN",
    "BlackBoxKD",
    "LogitDiscriminator",
    "default_discriminator_optimizer",
    "default_generator_optimizer",
    "random_crop",
]
