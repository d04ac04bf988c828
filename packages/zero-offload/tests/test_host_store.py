"""HostStore: state in host memory, handed out in place."""

from __future__ import annotations

import pytest
import torch

from zero_offload import HostStore


def test_state_lives_in_host_memory_and_put_writes_it():
    store = HostStore()
    value = torch.arange(6.0)
    store.create("m", value)
    got = store.get("m")
    assert got.device.type == "cpu" and torch.equal(got, value)
    assert got.data_ptr() != value.data_ptr()  # the store holds its own copy
    got.mul_(2)
    store.put("m", got)  # in place: nothing to copy
    assert torch.equal(store.get("m"), value * 2)
    store.put("m", torch.ones(6))
    assert torch.equal(store.get("m"), torch.ones(6))
    assert store.keys() == ["m"] and store.nbytes() == 24


def test_unknown_and_duplicate_keys_are_refused():
    store = HostStore()
    store.create("a", torch.zeros(1))
    with pytest.raises(KeyError, match="already exists"):
        store.create("a", torch.zeros(1))
    with pytest.raises(KeyError, match="no state named 'b'"):
        store.get("b")


def test_pinning_follows_cuda():
    assert HostStore().pin == torch.cuda.is_available()


def test_put_of_the_wrong_size_or_dtype_is_refused():
    store = HostStore()
    store.create("a", torch.zeros(4))
    with pytest.raises(ValueError, match="got 1 elements"):
        store.put("a", torch.tensor(5.0))
    with pytest.raises(ValueError, match="float64"):
        store.put("a", torch.zeros(4, dtype=torch.float64))


def test_a_deleted_key_is_gone_and_can_be_created_again():
    store = HostStore()
    store.create("a", torch.zeros(4))
    store.delete("a")
    assert store.keys() == [] and store.nbytes() == 0
    with pytest.raises(KeyError, match="no state named 'a'"):
        store.delete("a")
    store.create("a", torch.ones(2))
    assert torch.equal(store.get("a"), torch.ones(2))
