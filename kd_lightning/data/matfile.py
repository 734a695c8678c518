"""Reading MATLAB ``.mat`` files (formats v4 to v7.2, through :func:`scipy.io.loadmat`) with clear errors.

SVHN, Synthetic Digits and Stanford Dogs' split lists ship as ``.mat`` files. A missing, empty, corrupt
or truncated file, a MATLAB v7.3 (HDF5) file and a missing variable each raise
:class:`~kd_lightning.errors.DataNotFoundError` naming the file and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_lightning.errors import DataNotFoundError


def read_mat(path: str | os.PathLike, variables: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The named ``variables`` of the ``.mat`` file ``path`` (``what`` says which file it is, for errors)."""
    path = Path(path)
    expected = f"a MATLAB .mat file holding {', '.join(repr(v) for v in variables)}"
    try:
        size = path.stat().st_size
    except OSError:
        raise DataNotFoundError(f"{what}: file {str(path)!r} does not exist; expected {expected}") from None
    if size == 0:
        raise DataNotFoundError(f"{what}: {str(path)!r} is empty (0 bytes); expected {expected}")
    try:
        import scipy.io
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise DataNotFoundError(f"reading {str(path)!r} needs scipy: pip install scipy") from None
    try:
        data = scipy.io.loadmat(path, variable_names=list(variables))
    except NotImplementedError:  # scipy's answer to v7.3 files
        raise DataNotFoundError(
            f"{what}: {str(path)!r} is a MATLAB v7.3 (HDF5) file; expected the dataset's original v5 .mat file"
        ) from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types for damaged files
        raise DataNotFoundError(
            f"{what}: {str(path)!r} is corrupt or truncated ({type(e).__name__}: {e}); expected {expected}"
        ) from None
    missing = [v for v in variables if v not in data]
    if missing:
        raise DataNotFoundError(
            f"{what}: {str(path)!r} has no variable {missing[0]!r} (truncated or another file?); expected {expected}"
        )
    return {v: data[v] for v in variables}


def mat_strings(cell: np.ndarray, path: Path, name: str) -> list[str]:
    """A MATLAB cell array of strings (as loadmat returns it: an object array of 1-element arrays) as a list."""
    out = []
    for i, item in enumerate(np.asarray(cell, dtype=object).ravel()):
        flat = np.asarray(item).ravel()
        if flat.size != 1 or not isinstance(flat[0], str):
            raise DataNotFoundError(f"{str(path)!r}: {name}[{i}] is {item!r}; expected a cell array of strings")
        out.append(str(flat[0]))
    return out


def mat_labels(array: np.ndarray, path: Path, name: str, count: int | None = None) -> np.ndarray:
    """Integer labels from a MATLAB numeric vector (N, N x 1 or 1 x N), checked to be whole numbers."""
    values = np.asarray(array)
    if values.ndim > 2 or (values.ndim == 2 and 1 not in values.shape) or not np.issubdtype(values.dtype, np.number):
        raise DataNotFoundError(f"{str(path)!r}: {name} has shape {values.shape} {values.dtype}; expected a vector")
    values = values.ravel()
    if count is not None and len(values) != count:
        raise DataNotFoundError(f"{str(path)!r}: {len(values)} {name} for {count} images")
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise DataNotFoundError(f"{str(path)!r}: {name} are not whole numbers")
    return values.astype(np.int64)
