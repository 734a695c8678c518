"""One store for tensors kept per training sample, keyed by the batch's stable ``index``.

Three parts of the package keep something for every training sample: self-distillation's last predictions
(:class:`~kd_lightning.losses.self_kd.ProgressiveKL`), CRD's memory banks (:class:`~kd_lightning.losses.CRD`)
and DistillModule's teacher cache. They all use :class:`PerSampleStore`:

- **dense** rows (``row = index``; the default): the store covers the index range ``[0, size)``, set with
  :meth:`PerSampleStore.resize` from the DataModule (``num_indices``) or grown on write past the end;
- **sparse** rows (``sparse=True``): a row is given out on the first write of an index, at most ``capacity``
  of them (the teacher cache: the training set's size, not its index range, which may be much larger);
- **fields**: named tensors of ``rows x ...``, allocated on their first write (zeros, the written dtype) or set
  whole with :meth:`PerSampleStore.set_field` (CRD's random initial banks); ``seen`` marks written rows.

It is not an ``nn.Module`` and holds no buffers: DistributedDataParallel would broadcast buffers from rank 0
every step, while a per-sample store is either gathered (every rank writes every rank's samples, as the
progressive store does through ``LightningModule.all_gather``) or private to its rank (the teacher cache).
Its owner checkpoints it through ``state_dict``/``load_state_dict`` (the losses through
``nn.Module.get_extra_state``, so it sits in the model's state dict as ``..._extra_state``), which restores the
sizes too, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from kd_lightning.errors import CheckpointError, ConfigError


class PerSampleStore:
    """Tensors per training sample, keyed by sample index (see the module doc).

    Args:
        sparse: give rows out on first sight of an index (else ``row = index``).
        capacity: the most rows a sparse store gives out (set again by :meth:`resize`).
        name: what the store holds, for error messages.
    """

    def __init__(self, sparse: bool = False, capacity: int = 0, name: str = "per-sample store") -> None:
        self.sparse, self.capacity, self.name = sparse, capacity, name
        self.fields: dict[str, torch.Tensor] = {}
        self.seen = torch.zeros(0, dtype=torch.bool)  # per row
        self.slots = torch.zeros(0, dtype=torch.long)  # sparse: index -> row (-1: none yet)
        self.n_rows = 0  # sparse: rows given out

    # ------------------------------------------------------------------ size
    @property
    def size(self) -> int:
        """The index range covered: ``[0, size)``."""
        return len(self.slots) if self.sparse else len(self.seen)

    def resize(self, num_indices: int, capacity: int | None = None) -> None:
        """Cover the index range ``[0, num_indices)`` with an empty store (``capacity`` rows when sparse)."""
        if num_indices < 0:
            raise ConfigError(f"{self.name}: num_indices={num_indices}; expected a size >= 0")
        self.fields = {}
        if self.sparse:
            self.capacity = num_indices if capacity is None else capacity
            self.slots = torch.full((num_indices,), -1, dtype=torch.long)
            self.seen = torch.zeros(self.capacity, dtype=torch.bool)
            self.n_rows = 0
        else:
            self.seen = torch.zeros(num_indices, dtype=torch.bool)

    def _grow(self, size: int) -> None:
        """Dense stores grow (at least doubling) to cover indices up to ``size - 1``."""
        if size <= len(self.seen):
            return
        grow = max(size, 2 * len(self.seen)) - len(self.seen)
        self.seen = torch.cat([self.seen, self.seen.new_zeros(grow)])
        self.fields = {k: torch.cat([v, v.new_zeros((grow, *v.shape[1:]))]) for k, v in self.fields.items()}

    def to(self, device: torch.device | str) -> PerSampleStore:
        """Move every tensor to ``device`` (in place; returns the store)."""
        self.fields = {k: v.to(device) for k, v in self.fields.items()}
        self.seen = self.seen.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.seen.device

    # ------------------------------------------------------------------ rows
    def _check_range(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ConfigError(
                f"{self.name}: sample index {int(index.max()) if int(index.min()) >= 0 else int(index.min())} is "
                f"outside the index range [0, {self.size}) it was sized for"
            )

    def rows(self, index: torch.Tensor, allocate: bool = False) -> torch.Tensor:
        """The rows of ``index``, on the store's device.

        Sparse stores give -1 for an index not written yet, or a new row with ``allocate``.
        """
        index = index.detach().long().flatten()
        if not self.sparse:
            if allocate:
                self._grow(int(index.max()) + 1 if index.numel() else 0)
            self._check_range(index)
            return index.to(self.device)
        index = index.cpu()
        self._check_range(index)
        if allocate:
            new = index[self.slots[index] < 0].unique()
            if self.n_rows + len(new) > self.capacity:
                raise ConfigError(
                    f"{self.name} holds {self.capacity} samples (the training set's size) but the training batches "
                    "brought more distinct indices; is batch['index'] unique per sample?"
                )
            self.slots[new] = torch.arange(self.n_rows, self.n_rows + len(new))
            self.n_rows += len(new)
        return self.slots[index].to(self.device)

    def contains(self, index: torch.Tensor) -> torch.Tensor:
        """Whether each of ``index`` was written (bool, on the store's device)."""
        index = index.detach().long().flatten()
        if not self.sparse and index.numel() and int(index.max()) >= self.size:
            self._grow(int(index.max()) + 1)
        rows = self.rows(index)
        if self.sparse:
            return rows >= 0
        return self.seen[rows]

    # ------------------------------------------------------------------ values
    @torch.no_grad()
    def write(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Keep ``values`` (each ``len(index) x ...``) for the samples ``index`` (a later write replaces)."""
        for k, v in values.items():
            if len(v) != index.numel():
                raise ConfigError(f"{self.name}: {k} has {len(v)} rows for {index.numel()} indices")
        if values and self.device != next(iter(values.values())).device:
            self.to(next(iter(values.values())).device)
        rows = self.rows(index, allocate=True)
        n = len(self.seen)
        for k, v in values.items():
            if k not in self.fields:
                self.fields[k] = v.new_zeros((n, *v.shape[1:]))
            self.fields[k][rows] = v.detach().to(self.fields[k].dtype)
        self.seen[rows] = True

    def read(self, index: torch.Tensor, name: str) -> torch.Tensor:
        """Field ``name`` of the samples ``index`` (rows not written are zeros for dense stores)."""
        if name not in self.fields:
            raise KeyError(f"{self.name} has no field {name!r} (has: {', '.join(self.fields) or 'none'})")
        return self.fields[name][self.rows(index)]

    def field(self, name: str) -> torch.Tensor:
        """The whole table of field ``name`` (``rows x ...``); in-place changes change the store."""
        return self.fields[name]

    def set_field(self, name: str, table: torch.Tensor) -> None:
        """Set field ``name`` to ``table`` (one row per row of the store); the rows count as written."""
        if len(table) != len(self.seen):
            raise ConfigError(f"{self.name}: {name} has {len(table)} rows; the store has {len(self.seen)}")
        self.fields[name] = table.to(self.device)
        self.seen.fill_(True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The fields, seen flags and (sparse) slots, on the CPU."""
        state: dict[str, Any] = {
            "fields": {k: v.detach().cpu().clone() for k, v in self.fields.items()},
            "seen": self.seen.detach().cpu().clone(),
        }
        if self.sparse:
            state.update(slots=self.slots.clone(), n_rows=self.n_rows, capacity=self.capacity)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, sizes included."""
        if ("slots" in state) != self.sparse:
            raise CheckpointError(f"{self.name}: the checkpoint's store is {'sparse' if 'slots' in state else 'dense'}")
        self.fields = {k: v.clone().to(self.device) for k, v in state["fields"].items()}
        self.seen = state["seen"].bool().clone().to(self.device)
        if self.sparse:
            self.slots, self.n_rows, self.capacity = state["slots"].long().clone(), state["n_rows"], state["capacity"]


__all__ = ["PerSampleStore"]
