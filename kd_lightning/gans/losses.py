"""GAN losses: hinge and non-saturating ("vanilla") losses, and CcGAN's vicinal discriminator losses.

CcGAN (Ding et al., ICLR 2021): a regression label ``y`` in [0, 1] has (almost) no other image with
exactly the same label, so the discriminator at a target label ``t = y_j + eps`` (``eps ~ N(0,
sigma^2)``) is trained on real images whose labels lie in the vicinity of ``t`` and on fake images
generated at labels in that vicinity, with weights:

- HVDL (hard): real images with ``|y_i - t| <= kappa`` (weight 1), fake labels ``~ U[t - kappa, t + kappa]``;
- SVDL (soft): weight ``exp(-nu (y - t)^2)`` for real and fake; real images (and the fake-label range)
  restricted to where the weight exceeds a threshold (1e-3 in the official code).

Rule of thumb (the paper's Remark and the official code): ``sigma = 1.06 * std(y) * N^(-1/5)``
(Silverman), ``kappa = m_kappa * kappa_base`` with ``kappa_base`` the largest gap between
consecutive distinct training labels, and ``nu = 1 / kappa^2``.

The discriminator loss is ``mean_j(w_real_j * l_real(D(x_j, t_j))) + mean_j(w_fake_j * l_fake(D(G(z_j,
y'_j), t_j)))`` with ``l_real(d) = -log sigmoid(d)``, ``l_fake(d) = -log(1 - sigmoid(d))`` (vanilla) or
the hinge ``max(0, 1 - d)`` / ``max(0, 1 + d)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError

LossType = Literal["hinge", "vanilla"]
Vicinity = Literal["hard", "soft"]


def d_loss_parts(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    loss: LossType = "hinge",
    real_weights: torch.Tensor | None = None,
    fake_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator loss on real and on fake logits, each a (weighted) mean over the batch."""
    if loss == "hinge":
        lr, lf = F.relu(1.0 - real_logits), F.relu(1.0 + fake_logits)
    elif loss == "vanilla":
        lr, lf = F.softplus(-real_logits), F.softplus(fake_logits)  # -log s(d), -log(1 - s(d))
    else:
        raise ConfigError(f"loss={loss!r}; expected 'hinge' or 'vanilla'")
    if real_weights is not None:
        lr = lr * real_weights
    if fake_weights is not None:
        lf = lf * fake_weights
    return lr.mean(), lf.mean()


def g_loss(fake_logits: torch.Tensor, loss: LossType = "hinge") -> torch.Tensor:
    """Generator loss: ``-mean D`` (hinge) or the non-saturating ``-mean log sigmoid(D)`` (vanilla)."""
    if loss == "hinge":
        return -fake_logits.mean()
    if loss == "vanilla":
        return F.softplus(-fake_logits).mean()
    raise ConfigError(f"loss={loss!r}; expected 'hinge' or 'vanilla'")


def rule_of_thumb_sigma(labels: torch.Tensor) -> float:
    """Silverman's bandwidth ``1.06 * std * N^(-1/5)`` of the normalised training labels (population std)."""
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if len(y) < 2:
        raise ConfigError(f"need at least 2 training labels for the CcGAN rule of thumb, got {len(y)}")
    return float(1.06 * y.std(unbiased=False) * len(y) ** (-1 / 5))


def kappa_base(labels: torch.Tensor) -> float:
    """The largest gap between consecutive distinct training labels."""
    u = torch.unique(torch.as_tensor(labels, dtype=torch.float64).flatten())  # sorted
    if len(u) < 2:
        raise ConfigError("CcGAN needs at least 2 distinct training labels")
    return float((u[1:] - u[:-1]).max())


def vicinal_weights(
    labels: torch.Tensor, targets: torch.Tensor, vicinity: Vicinity, kappa: float, nu: float
) -> torch.Tensor:
    """Weight of label ``labels[j]`` at target ``targets[j]``: ``1{|y-t| <= kappa}`` or ``exp(-nu (y-t)^2)``."""
    d = labels.double() - targets.double()
    if vicinity == "hard":
        return (d.abs() <= kappa).to(labels.dtype if labels.is_floating_point() else torch.float32)
    if vicinity == "soft":
        return torch.exp(-nu * d**2).float()
    raise ConfigError(f"vicinity={vicinity!r}; expected 'hard' (HVDL) or 'soft' (SVDL)")


class VicinalSampler:
    """Draws CcGAN's target labels, the real images in their vicinity and the fake labels (Algorithm 1).

    Args:
        train_labels: every normalised training label (the real images are indexed like them).
        vicinity: ``"hard"`` (HVDL) or ``"soft"`` (SVDL).
        sigma: std of the label noise; ``None`` = rule of thumb.
        kappa: HVDL half-width; ``None`` = ``kappa_multiplier * kappa_base``.
        nu: SVDL sharpness; ``None`` = ``1 / (kappa_multiplier * kappa_base)^2``.
        kappa_multiplier: the ``m_kappa`` of the rule of thumb.
        soft_threshold: SVDL ignores samples whose weight would be below this.
    """

    def __init__(
        self,
        train_labels: torch.Tensor,
        vicinity: Vicinity = "hard",
        sigma: float | None = None,
        kappa: float | None = None,
        nu: float | None = None,
        kappa_multiplier: float = 1.0,
        soft_threshold: float = 1e-3,
    ) -> None:
        y = torch.as_tensor(train_labels, dtype=torch.float64).flatten()
        if len(y) and (y.min() < 0 or y.max() > 1):
            raise ConfigError(f"CcGAN labels must be normalised to [0, 1]; got [{y.min():.4g}, {y.max():.4g}]")
        if vicinity not in ("hard", "soft"):
            raise ConfigError(f"vicinity={vicinity!r}; expected 'hard' (HVDL) or 'soft' (SVDL)")
        if not 0 < soft_threshold < 1:
            raise ConfigError(f"soft_threshold={soft_threshold}; expected a number in (0, 1)")
        self.labels = y
        self.sorted, self.order = torch.sort(y)
        self.unique = torch.unique(y)
        self.vicinity = vicinity
        self.sigma = rule_of_thumb_sigma(y) if sigma is None else float(sigma)
        base = kappa_base(y) * kappa_multiplier if (kappa is None or nu is None) else 0.0
        self.kappa = base if kappa is None else float(kappa)
        self.nu = (1.0 / base**2 if base > 0 else math.inf) if nu is None else float(nu)
        self.soft_threshold = soft_threshold
        # half-width of the label window: where real images are taken and fake labels drawn
        self.radius = self.kappa if vicinity == "hard" else math.sqrt(-math.log(soft_threshold) / self.nu)

    def draw_unique(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` labels uniformly, with replacement, from the DISTINCT training labels.

        As the official code's ``np.random.choice(unique_train_labels, size=n, replace=True)``: every label
        value is equally likely, whatever its frequency.
        """
        return self.unique[torch.randint(len(self.unique), (n,), generator=generator)]

    def targets(
        self, base_labels: torch.Tensor, generator: torch.Generator | None = None, tries: int = 100
    ) -> torch.Tensor:
        """``y_j + eps_j``; eps is redrawn for a target whose window holds no real label (as the official code)."""
        base = base_labels.double().cpu()
        t = base + self.sigma * torch.randn(len(base), generator=generator, dtype=torch.float64)
        for _ in range(tries):
            empty = self.counts(t) == 0
            if not empty.any():
                return t
            t[empty] = base[empty] + self.sigma * torch.randn(
                int(empty.sum()), generator=generator, dtype=torch.float64
            )
        empty = self.counts(t) == 0
        t[empty] = base[empty]  # a training label always has itself in its window
        return t

    def _window(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.searchsorted(self.sorted, t - self.radius, side="left")
        hi = torch.searchsorted(self.sorted, t + self.radius, side="right")
        return lo, hi

    def counts(self, t: torch.Tensor) -> torch.Tensor:
        """Number of real labels in the window of every target."""
        lo, hi = self._window(t.double())
        return hi - lo

    def real_indices(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training index per target, uniform among the real labels in its window."""
        lo, hi = self._window(t.double())
        if ((hi - lo) < 1).any():
            raise ConfigError("a target label has no real image in its vicinity; draw targets with .targets()")
        pick = lo + (torch.rand(len(t), generator=generator, dtype=torch.float64) * (hi - lo)).long()
        pick = torch.minimum(pick, hi - 1)
        return self.order[pick]

    def fake_labels(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels of the fake images: ``U[max(0, t - r), min(1, t + r)]`` (r = kappa, or the SVDL radius)."""
        t = t.double()
        lo, hi = (t - self.radius).clamp(min=0.0), (t + self.radius).clamp(max=1.0)
        hi = torch.maximum(hi, lo)
        return lo + (hi - lo) * torch.rand(len(t), generator=generator, dtype=torch.float64)

    def weights(self, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """HVDL/SVDL weights of samples with ``labels`` at targets ``t``."""
        return vicinal_weights(labels.double(), t.double(), self.vicinity, self.kappa, self.nu).float()
