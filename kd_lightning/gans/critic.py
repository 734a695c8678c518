"""AI-KD's critic on logits and its WGAN-GP losses (plain ``nn.Module`` and functions; no Lightning).

:class:`LogitCritic` is AI-KD's discriminator on a classifier's logits; :func:`wgan_gp_critic_parts` is its
WGAN-GP loss (Gulrajani et al. 2017) against S_sup's logits and :func:`adversarial_loss` the student's ``L_A``.
:class:`~kd_lightning.methods.self_kd.SelfKD` trains them; the settings checks live here with the critic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from kd_lightning.errors import ConfigError

CriticNorm = Literal["joint", "none", "separate"]
CRITIC_NORMS: tuple[str, ...] = ("joint", "none", "separate")
#: (critic_lr, critic_betas) of SelfKD's default critic Adam; critic_optimizer replaces that Adam
CRITIC_ADAM_DEFAULTS: tuple[float, tuple[float, float]] = (1e-3, (0.0, 0.9))


def default_critic_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The paper's critic optimiser: Adam, lr 1e-4 (AI-KD sec. 4.2; betas are not stated there: PyTorch's defaults).

    ``SelfKD``'s own default is Adam with ``critic_lr`` and ``critic_betas`` (1e-3, (0, 0.9)).
    """
    return torch.optim.Adam(params, lr=1e-4)


def check_critic_schedule(
    critic_steps: int,
    critic_lr: float,
    critic_betas: tuple[float, float],
    critic_warmup_steps: int,
    critic_warmup_epochs: int,
    critic_lost_epochs: int,
) -> None:
    """Clear errors for the critic's schedule settings (see :class:`~kd_lightning.methods.self_kd.SelfKD`)."""
    if isinstance(critic_steps, bool) or not isinstance(critic_steps, int) or critic_steps < 1:
        raise ConfigError(f"critic_steps={critic_steps!r}; expected an integer >= 1 (critic updates per student step)")
    if not critic_lr > 0:
        raise ConfigError(f"critic_lr={critic_lr}; expected a learning rate > 0")
    betas = tuple(critic_betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"critic_betas={list(critic_betas)}; expected two Adam betas in [0, 1)")
    for name, value in (
        ("critic_warmup_steps", critic_warmup_steps),
        ("critic_warmup_epochs", critic_warmup_epochs),
        ("critic_lost_epochs", critic_lost_epochs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r}; expected an integer >= 0")
    if critic_warmup_steps > 0 and critic_warmup_epochs > 0:
        raise ConfigError(
            f"critic_warmup_steps={critic_warmup_steps} and critic_warmup_epochs={critic_warmup_epochs}; "
            "set one of them (the other 0)"
        )


# ---------------------------------------------------------------------------------------- critic
class LogitCritic(nn.Module):
    """AI-KD's discriminator on logits: FC(C->h1)-BN1d-LeakyReLU-FC(h1->h2)-LeakyReLU-FC(h2->1).

    The paper names FC 64 and FC 32 with one BN1d and LeakyReLU between them; the scalar output
    layer is implied by the WGAN critic, the LeakyReLU slope (0.2, the usual GAN value) is not given.
    ``batch_norm=False`` leaves the BN out (WGAN-GP's advice; see :func:`critic_scores`).
    """

    def __init__(
        self,
        num_classes: int,
        hidden: tuple[int, int] = (64, 32),
        negative_slope: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        h1, h2 = hidden
        self.layers = nn.Sequential(
            nn.Linear(num_classes, h1),
            nn.BatchNorm1d(h1) if batch_norm else nn.Identity(),
            nn.LeakyReLU(negative_slope),
            nn.Linear(h1, h2),
            nn.LeakyReLU(negative_slope),
            nn.Linear(h2, 1),
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """N x C logits -> N critic scores."""
        return self.layers(logits).squeeze(-1)


def critic_scores(critic: nn.Module, *batches: torch.Tensor, joint: bool = True) -> list[torch.Tensor]:
    """The critic's scores of each batch.

    ``joint``: one forward pass on all of them concatenated, so a BatchNorm in the critic normalises them with
    shared statistics; else one pass per batch.
    """
    if joint:
        return list(critic(torch.cat(batches)).split([len(b) for b in batches]))
    return [critic(b) for b in batches]


def wgan_gp_critic_parts(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    gp_weight: float = 10.0,
    joint: bool = True,
    eps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """WGAN-GP critic loss ``E[D(fake)] - E[D(real)] + gp_weight * E[(||grad D(x_hat)||_2 - 1)^2]``.

    ``x_hat = eps real + (1 - eps) fake`` with ``eps`` (N, uniform in [0, 1], drawn from torch's global
    generator unless given). With ``joint`` real, fake and x_hat go through the critic as one batch; else as three
    (the penalty then differentiates a pass of x_hat alone). fp32 with autocast off. Returns ``critic`` (the
    loss), ``wasserstein`` (``E[D(real)] - E[D(fake)]``) and ``gp``.
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        real, fake, x_hat = _interpolate(real, fake, eps)
        d_real, d_fake, d_hat = critic_scores(critic, real, fake, x_hat, joint=joint)
        (grad,) = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)
        gp = ((grad.norm(2, dim=1) - 1.0) ** 2).mean()
        wasserstein = d_real.mean() - d_fake.mean()
        return {"critic": -wasserstein + gp_weight * gp, "wasserstein": wasserstein, "gp": gp}


def _interpolate(
    real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached fp32 ``real`` and ``fake`` and WGAN-GP's ``x_hat = eps real + (1 - eps) fake`` (requires grad).

    ``eps`` is drawn from torch's global generator unless given.
    """
    real, fake = real.detach().float(), fake.detach().float()
    if eps is None:
        eps = torch.rand(real.shape[0], 1).to(real.device)
    eps = eps.reshape(-1, 1).float().to(real.device)
    return real, fake, (eps * real + (1.0 - eps) * fake).requires_grad_(True)


def adversarial_loss(critic: nn.Module, fake: torch.Tensor, real: torch.Tensor, joint: bool = True) -> torch.Tensor:
    """The student's ``L_A = -E[D(fake)]`` (fp32, autocast off).

    With ``joint`` the critic scores ``fake`` in one batch with the (detached) ``real`` logits, as in its own
    step, so its BN statistics include both.
    """
    with torch.autocast(device_type=fake.device.type, enabled=False):
        if joint:
            _, d_fake = critic_scores(critic, real.detach().float(), fake.float(), joint=True)
        else:
            d_fake = critic(fake.float())
        return -d_fake.mean()


__all__ = [
    "CRITIC_ADAM_DEFAULTS",
    "CRITIC_NORMS",
    "CriticNorm",
    "LogitCritic",
    "adversarial_loss",
    "check_critic_schedule",
    "critic_scores",
    "default_critic_optimizer",
    "wgan_gp_critic_parts",
]
