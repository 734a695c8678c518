"""cGAN-KD's sample processing: cDR-RS rejection sampling, teacher filtering/relabelling, the on-disk store."""

from kd_lightning.sampling.filtering import (
    class_cutoffs,
    classification_errors,
    global_cutoff,
    keep_mask,
    regression_errors,
)
from kd_lightning.sampling.rejection import AcceptanceError, accept, chunk_generator, estimate_max
from kd_lightning.sampling.store import SampleStore, StoreError, open_store, sha256_file

__all__ = [
    "AcceptanceError",
    "SampleStore",
    "StoreError",
    "accept",
    "chunk_generator",
    "class_cutoffs",
    "classification_errors",
    "estimate_max",
    "global_cutoff",
    "keep_mask",
    "open_store",
    "regression_errors",
    "sha256_file",
]
