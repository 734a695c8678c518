"""PerSampleStore: the one store behind the progressive term, CRD's banks and the teacher cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.per_sample import PerSampleStore


def test_dense_store_keys_rows_by_index_and_grows() -> None:
    store = PerSampleStore()
    assert store.size == 0 and store.contains(torch.tensor([3])).tolist() == [False]  # grows to cover index 3
    store.write(torch.tensor([5, 1]), logits=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert store.size == 8  # at least doubling: max(6, 2 * 4)
    assert store.read(torch.tensor([1, 5, 2]), "logits").tolist() == [[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]]
    assert store.contains(torch.tensor([1, 2, 5])).tolist() == [True, False, True]
    store.write(torch.tensor([5]), logits=torch.tensor([[9.0, 9.0]]))  # a later write replaces
    assert store.read(torch.tensor([5]), "logits").tolist() == [[9.0, 9.0]]
    with pytest.raises(KeyError, match="no field 'banks'"):
        store.read(torch.tensor([5]), "banks")
    with pytest.raises(ConfigError, match="sample index 8 is outside the index range"):
        store.read(torch.tensor([8]), "logits")


def test_sparse_store_gives_rows_on_first_sight_up_to_its_capacity() -> None:
    store = PerSampleStore(sparse=True, name="the teacher cache")
    store.resize(1000, capacity=3)  # a large index range, few samples
    store.write(torch.tensor([900, 7]), logits=torch.tensor([[1.0], [2.0]]), feat=torch.ones(2, 2, 2))
    assert store.fields["logits"].shape == (3, 1) and store.fields["feat"].shape == (3, 2, 2)
    assert store.contains(torch.tensor([7, 8, 900])).tolist() == [True, False, True]
    assert store.read(torch.tensor([7, 900]), "logits").tolist() == [[2.0], [1.0]]
    store.write(torch.tensor([7]), logits=torch.tensor([[5.0]]), feat=torch.zeros(1, 2, 2))  # same row again
    store.write(torch.tensor([8]), logits=torch.tensor([[3.0]]), feat=torch.zeros(1, 2, 2))
    assert store.n_rows == 3
    with pytest.raises(ConfigError, match="the teacher cache holds 3 samples"):
        store.write(torch.tensor([9]), logits=torch.tensor([[0.0]]), feat=torch.zeros(1, 2, 2))
    with pytest.raises(ConfigError, match="sample index 1000 is outside the index range"):
        store.contains(torch.tensor([1000]))


def test_state_round_trip_restores_sizes_and_kind() -> None:
    dense = PerSampleStore()
    dense.resize(4)
    dense.set_field("bank", torch.arange(8.0).view(4, 2))
    sparse = PerSampleStore(sparse=True)
    sparse.resize(10, capacity=2)
    sparse.write(torch.tensor([9]), logits=torch.tensor([[7.0]]))
    for store in (dense, sparse):
        fresh = PerSampleStore(sparse=store.sparse)
        fresh.load_state_dict(store.state_dict())
        assert fresh.size == store.size and fresh.fields.keys() == store.fields.keys()
        for k in store.fields:
            assert torch.equal(fresh.fields[k], store.fields[k])
        assert torch.equal(fresh.seen, store.seen)
    with pytest.raises(CheckpointError, match="the checkpoint's store is dense"):
        PerSampleStore(sparse=True).load_state_dict(dense.state_dict())


def test_a_crd_checkpoint_with_the_old_bank_buffers_still_loads(tmp_path: Path) -> None:
    from kd_lightning.losses import CRD

    crd = CRD(feat_dim=4, nce_k=2)
    crd.setup_data(6)
    state = crd.state_dict()
    old = {k: v for k, v in state.items() if k != "_extra_state"}
    old.update(memory_s=crd.memory_s.clone(), memory_t=crd.memory_t.clone())  # the buffers of old checkpoints
    fresh = CRD(feat_dim=4, nce_k=2)
    fresh.resize_for_state(old, "")
    fresh.load_state_dict(old)
    assert torch.equal(fresh.memory_s, crd.memory_s) and torch.equal(fresh.memory_t, crd.memory_t)
    assert fresh.banks.size == 6
