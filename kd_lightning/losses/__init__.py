"""Knowledge-distillation losses."""

from kd_lightning.losses.functional import kd_kl, kl_to_probs

__all__ = ["kd_kl", "kl_to_probs"]
