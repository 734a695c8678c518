"""Knowledge-distillation losses: one interface (:class:`KDLoss`); its subclasses are the lookup.

``list_losses()`` names them; recipes select them by class name, e.g.
``kd_losses: [{class_path: BLKD, init_args: {T: 4, weight: 0.9}}]``.
"""

from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, get_loss, list_losses
from kd_lightning.losses.contrastive import CRD
from kd_lightning.losses.factor import AB, FT
from kd_lightning.losses.features import AT, VID, FitNet
from kd_lightning.losses.functional import kd_kl, kl_to_probs
from kd_lightning.losses.logits import BLKD, DKD
from kd_lightning.losses.relations import PKT, RKD, SP
from kd_lightning.losses.review import ReviewKD
from kd_lightning.losses.self_kd import ClassWiseKL, GuideKL, ProgressiveKL, SelfKDTerm, list_self_kd_terms
from kd_lightning.losses.semckd import SemCKD
from kd_lightning.losses.simkd import SimKD
from kd_lightning.losses.sskd import SSKD

__all__ = [
    "AB",
    "AT",
    "BLKD",
    "CRD",
    "DKD",
    "FT",
    "PKT",
    "RKD",
    "SP",
    "SSKD",
    "VID",
    "ClassWiseKL",
    "FitNet",
    "GuideKL",
    "KDLoss",
    "Outputs",
    "ProgressiveKL",
    "ReviewKD",
    "SelfKDTerm",
    "SemCKD",
    "SetupInfo",
    "SimKD",
    "StepContext",
    "get_loss",
    "kd_kl",
    "kl_to_probs",
    "list_losses",
    "list_self_kd_terms",
]
