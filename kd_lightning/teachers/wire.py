"""The black-box teacher's wire format and protocol constants, defined once for both ends.

The server (:mod:`kd_lightning.serve`) and the client (:mod:`kd_lightning.teachers.client`) both import from
here, so the two cannot drift apart and neither imports the other for them.

The protocol (:class:`BlackBoxTeacher`) is ``query(images) -> answers``: images in [0, 1] (N x C x H x W)
go out, and either soft answers (``N x num_classes`` float32 probabilities) or hard answers (``N``
int64 class ids) come back. No logits, no gradients, no weights.

On the wire, ``POST /query`` carries one ``.npy`` array of images (binary, self-describing, never pickled), by
default quantised to uint8 as an image API would take them (:data:`WIRE_DTYPES`), with an optional request id
(:data:`REQUEST_ID_HEADER`) that makes a retry idempotent; the answer is one ``.npy`` array, with headers saying
whether it was replayed and how many images were charged. ``GET /health`` gives the model's facts.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

Responses = Literal["soft", "hard"]
WireDType = Literal["uint8", "float16", "float32"]

RESPONSES: tuple[Responses, ...] = ("soft", "hard")
WIRE_DTYPES: tuple[WireDType, ...] = ("uint8", "float16", "float32")
NPY_CONTENT_TYPE = "application/x-npy"
CONTENT_TYPES = (NPY_CONTENT_TYPE, "application/octet-stream")  # what the server accepts as a request body
HEALTH_PATH, QUERY_PATH = "/health", "/query"
REQUEST_ID_HEADER = "X-Request-Id"  # the client's idempotency key
REPLAYED_HEADER = "X-Replayed"  # "true": answered from the server's replay record, not charged again
CHARGED_HEADER = "X-Charged"  # images charged for this request
TOKEN_ENV = "KDL_TEACHER_TOKEN"  # where both ends read the bearer token when none is given


@runtime_checkable
class BlackBoxTeacher(Protocol):
    """A teacher seen only through its answers."""

    responses: Responses
    num_classes: int

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> ``N x num_classes`` probabilities (soft) or ``N`` class ids (hard)."""
        ...


def encode_array(array: np.ndarray) -> bytes:
    """A numpy array as ``.npy`` bytes (no pickling)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> array; :class:`ValueError` on anything else (pickles included)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several kinds on malformed input
        raise ValueError(f"not a .npy array ({type(e).__name__}: {e})") from None


def to_wire(images: torch.Tensor, wire_dtype: WireDType) -> np.ndarray:
    """Images in [0, 1] as the array that is sent (uint8 = round(255 x), or float16/float32)."""
    x = images.detach().float().cpu().clamp(0, 1)
    if wire_dtype == "uint8":
        return (x * 255).round().to(torch.uint8).numpy()
    return x.numpy().astype(wire_dtype)


def from_wire(array: np.ndarray) -> torch.Tensor:
    """The wire array back to float32 images in [0, 1] (what the teacher sees)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


def image_hashes(wire: np.ndarray) -> list[bytes]:
    """SHA-256 of every image's wire bytes (dtype and shape included, so equal bytes mean equal images)."""
    tag = f"{wire.dtype.str}{wire.shape[1:]}".encode()
    return [hashlib.sha256(tag + np.ascontiguousarray(row).tobytes()).digest() for row in wire]
