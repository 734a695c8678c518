"""Losses with a pre-training stage: FT (factor transfer) and AB (activation boundaries).

FT's paraphraser is trained first on the teacher's features (``kd_lightning.methods.FTParaphraser``,
``recipes/*/ft_paraphraser.yaml``) and then frozen; AB's loss initialises the student before its
normal training (``recipes/*/ab_init.yaml`` then ``ab.yaml``). Both losses also run without their
stage (FT then trains its paraphraser alongside, AB acts as an ordinary extra term).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.losses.features import _stage_names, match_spatial, pair_stages
from kd_lightning.losses.relations import _last_stage


def _conv(cin: int, cout: int, transpose: bool = False, bn: bool = True) -> list[nn.Module]:
    conv = nn.ConvTranspose2d(cin, cout, 3, 1, 1) if transpose else nn.Conv2d(cin, cout, 3, 1, 1)
    # nn.Identity keeps the layer numbering (encoder.0, encoder.3, ...) of the variant with BatchNorm
    return [conv, nn.BatchNorm2d(cout) if bn else nn.Identity(), nn.LeakyReLU(0.1, inplace=True)]


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder on a teacher map whose code has ``rate * C`` channels.

    Three 3x3 conv-LeakyReLU layers encode (``C -> C -> rate C -> rate C``), three transposed ones
    decode back to ``C``; the code is the teacher's *factor*. ``bn=False`` (default) is RepDistiller's
    paraphraser (its ``use_bn=False``); ``bn=True`` puts a BatchNorm after every convolution (this
    project's layout before it matched RepDistiller; RepDistiller's translator has them).
    """

    def __init__(self, channels: int, rate: float = 0.5, bn: bool = False) -> None:
        super().__init__()
        if rate <= 0:
            raise ConfigError(f"FT: rate={rate}; expected a positive paraphrase rate")
        k = max(1, round(channels * rate))
        self.channels, self.rate, self.factor_channels, self.bn = channels, rate, k, bn
        self.encoder = nn.Sequential(*_conv(channels, channels, bn=bn), *_conv(channels, k, bn=bn), *_conv(k, k, bn=bn))
        self.decoder = nn.Sequential(
            *_conv(k, k, True, bn=bn), *_conv(k, channels, True, bn=bn), *_conv(channels, channels, True, bn=bn)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(factor, reconstruction)`` of a teacher map."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Sequential):
    """FT's translator: three 3x3 conv-BN-LeakyReLU layers from the student map to ``k`` factor channels."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__(*_conv(channels, channels), *_conv(channels, k), *_conv(k, k))


class _Frozen(nn.Module):
    """A pre-trained part kept in eval mode with gradients off, whatever the Trainer does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> Any:  # noqa: ANN401 - whatever the wrapped module returns
        with torch.no_grad():
            return self.module(x)


def load_paraphraser(path: str, channels: int, feature: str | None = None) -> Paraphraser:
    """The paraphraser saved by a ``FTParaphraser`` run (tensors and plain values only: ``weights_only``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"FT: paraphraser checkpoint {path!r} does not exist (run ft_paraphraser first)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise CheckpointError(f"FT: paraphraser checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    own = {k[len("paraphraser.") :]: v for k, v in state.items() if k.startswith("paraphraser.")}
    if not own or "rate" not in hp:
        raise CheckpointError(f"FT: {path!r} holds no paraphraser; expected a checkpoint of an FTParaphraser run")
    trained_on = ckpt.get("paraphraser_feature")
    if feature is not None and trained_on is not None and trained_on != feature:
        raise ConfigError(
            f"FT: the paraphraser in {path!r} was trained on the teacher feature {trained_on!r} but FT reads "
            f"{feature!r}; set teacher_feature: {trained_on} or retrain it"
        )
    para = Paraphraser(channels, float(hp["rate"]), bn="encoder.1.weight" in own)  # BN or not: as it was trained
    theirs = own["encoder.0.weight"].shape[1]
    if theirs != channels:
        raise ConfigError(
            f"FT: the paraphraser in {path!r} reads {theirs}-channel teacher maps but the teacher feature has "
            f"{channels} channels; train it on this teacher and feature"
        )
    para.load_state_dict(own)
    return para


class FT(KDLoss):
    """Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018).

    The teacher's last map is encoded by a pre-trained, frozen paraphraser into a factor ``F_T``; a
    translator maps the student's last map to ``F_S``. ``form="paper"`` (default) is the paper's
    ``|| F_T/||F_T||_2 - F_S/||F_S||_2 ||_p`` on the vectorised factors, ``p = 1``, averaged over the
    batch, default weight 1000. ``form="repdistiller"`` is RepDistiller's (which cGAN-KD ran; the
    recipes use it with weight 200): each factor is first reduced to the channel mean of its squares,
    then L2-normalised, and the loss is the mean of ``|d|^p`` over positions and the batch. A larger
    factor map is average-pooled to the smaller one.

    Without ``paraphraser`` the paraphraser learns in the same run from its reconstruction loss
    (part ``rec``, on detached teacher maps, scaled to weigh ``rec_weight`` in the total) while the
    student learns from its current, detached factor.

    Args:
        paraphraser: checkpoint of an ``FTParaphraser`` run on this teacher (``None``: trained alongside).
        rate: paraphrase rate ``k`` (factor channels / teacher channels) when trained alongside.
        p: exponent of the factor distance (1 or 2).
        form: ``"paper"`` or ``"repdistiller"`` (see above).
        student_feature: the student's map (default its last stage).
        teacher_feature: the teacher's map (default its last stage).
        rec_weight: weight of the reconstruction loss when the paraphraser is trained alongside.
        paraphraser_bn: BatchNorm in a paraphraser trained alongside (default off: RepDistiller's); a
            loaded paraphraser keeps the layout it was trained with.
        weight: factor in the total loss.
    """

    def __init__(
        self,
        paraphraser: str | None = None,
        rate: float = 0.5,
        p: int = 1,
        form: Literal["paper", "repdistiller"] = "paper",
        student_feature: str | None = None,
        teacher_feature: str | None = None,
        rec_weight: float = 1.0,
        paraphraser_bn: bool = False,
        weight: float = 1000.0,
    ) -> None:
        super().__init__(weight)
        if p not in (1, 2):
            raise ConfigError(f"FT: p={p}; expected 1 or 2")
        if form not in ("paper", "repdistiller"):
            raise ConfigError(f"FT: form={form!r}; expected 'paper' or 'repdistiller'")
        self.paraphraser_path, self.rate, self.p, self.form = paraphraser, rate, p, form
        self._given = (student_feature, teacher_feature)
        self.rec_weight, self.paraphraser_bn = rec_weight, paraphraser_bn

    def setup(self, info: SetupInfo) -> None:
        s = self._given[0] or _last_stage(self, info.student_shapes, "student")
        t = self._given[1] or _last_stage(self, info.teacher_shapes, "teacher")
        sc = require_shape(self, "student", info.student_shapes, s, 3)[0]
        tc = require_shape(self, "teacher", info.teacher_shapes, t, 3)[0]
        self.student_features, self.teacher_features = (s,), (t,)
        if self.paraphraser_path:
            para = load_paraphraser(self.paraphraser_path, tc, t)
            self.paraphraser: nn.Module = _Frozen(para)
            self.online = False
        else:
            para = Paraphraser(tc, self.rate, self.paraphraser_bn)
            self.paraphraser = para
            self.online = True
        self.translator = Translator(sc, para.factor_channels)

    def factor_distance(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if self.form == "repdistiller":
            f_s, f_t = f_s.float().pow(2).mean(1), f_t.float().pow(2).mean(1)
        d = F.normalize(f_s.float().flatten(1), dim=1) - F.normalize(f_t.float().flatten(1), dim=1)
        d = d.abs().pow(self.p)
        return d.mean() if self.form == "repdistiller" else d.sum(1).pow(1.0 / self.p).mean()

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        t = teacher.features[self.teacher_features[0]].detach()
        f_s = self.translator(student.features[self.student_features[0]])
        if not self.online:
            f_t = self.paraphraser(t)[0]
            return self.factor_distance(*match_spatial(f_s, f_t))
        f_t, rec = self.paraphraser(t)
        ft = self.factor_distance(*match_spatial(f_s, f_t.detach()))
        # the term is multiplied by ``weight``: divide so that the reconstruction weighs ``rec_weight``
        rec_loss = F.mse_loss(rec, t) * (self.rec_weight / max(self.weight, 1e-12))
        return {"ft": ft, "rec": rec_loss}


class AB(KDLoss):
    """Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons" (AAAI 2019).

    For each paired stage a connector maps the student map to the teacher's: as RepDistiller's
    ``Connector``, the identity when the two maps have the same channels and size and a 1x1 conv + BN
    otherwise (``connector="repdistiller"``, default; RepDistiller's ``ConvReg`` also strides or
    transposes for a 2x size change, here the larger map is average-pooled instead), or always a
    1x1 conv + BN (``connector="always"``, this project's layout before it matched RepDistiller);
    with ``rho = [t > 0]`` (which neurons the teacher activates) the loss is
    ``|| rho * relu(m - r(s))^2 + (1 - rho) * relu(m + r(s))^2 ||_1``: summed over neurons, averaged over
    the batch, and summed over stages (``stage_weights``). Margin ``m = 1``. The paper uses it to
    initialise the student (no task loss) before normal training: ``recipes/*/ab_init.yaml``.

    Args:
        stages: stage names paired between student and teacher; ``None`` pairs every declared stage.
        margin: the margin ``m``.
        stage_weights: a factor per paired stage (default 1 each; RepDistiller uses ``2^(i - n + 1)``).
        connector: ``"repdistiller"`` (identity for equal shapes) or ``"always"`` (see above).
        weight: factor in the total loss.
    """

    def __init__(
        self,
        stages: list[str] | None = None,
        margin: float = 1.0,
        stage_weights: list[float] | None = None,
        connector: Literal["repdistiller", "always"] = "repdistiller",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if margin < 0:
            raise ConfigError(f"AB: margin={margin}; expected a value >= 0")
        if connector not in ("repdistiller", "always"):
            raise ConfigError(f"AB: connector={connector!r}; expected 'repdistiller' or 'always'")
        self.stages, self.margin, self.stage_weights, self.connector = stages, margin, stage_weights, connector

    def setup(self, info: SetupInfo) -> None:
        s_names, t_names = _stage_names(info.student_shapes), _stage_names(info.teacher_shapes)
        if not self.stages and len(s_names) != len(t_names):
            s_shapes = [tuple(info.student_shapes[n]) for n in s_names]
            t_shapes = [tuple(info.teacher_shapes[n]) for n in t_names]
            raise ConfigError(
                f"AB pairs the student's stage i with the teacher's stage i, but the student's stages are {s_shapes} "
                f"and the teacher's {t_shapes} (C, H, W); list the stages to pair (e.g. stages: [stage0, stage1])"
            )
        names = pair_stages(self, info, self.stages)
        if self.stage_weights is not None and len(self.stage_weights) != len(names):
            raise ConfigError(f"AB: stage_weights has {len(self.stage_weights)} values for {len(names)} stages")
        self.connectors = nn.ModuleList()
        for n in names:
            s_shape = tuple(require_shape(self, "student", info.student_shapes, n, 3))
            t_shape = tuple(require_shape(self, "teacher", info.teacher_shapes, n, 3))
            if self.connector == "repdistiller" and s_shape == t_shape:
                self.connectors.append(nn.Identity())
            else:
                conv = nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False)
                self.connectors.append(nn.Sequential(conv, nn.BatchNorm2d(t_shape[0])))
        self.student_features = self.teacher_features = tuple(names)

    def boundary_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        on = (t > 0).float()
        m = self.margin
        per = on * F.relu(m - s).pow(2) + (1 - on) * F.relu(m + s).pow(2)
        return per.flatten(1).sum(1).mean()

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        weights = self.stage_weights or [1.0] * len(self.connectors)
        for n, conn, w in zip(self.student_features, self.connectors, weights):
            s, t = match_spatial(conn(student.features[n]).float(), teacher.features[n].float())
            total = total + w * self.boundary_loss(s, t)
        return total
