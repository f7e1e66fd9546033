"""KVStore sizing and pinning, and the exact-size page-locked host buffer."""

from __future__ import annotations

import gc

import pytest
import torch

from pagedkv.cache.spec import KVSpec
from pagedkv.tiers.kv_store import KVStore, can_pin_memory, pinned_empty
from pagedkv.tiers.transfer import CopyTransferEngine

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)


def test_from_bytes_takes_whole_blocks_and_refuses_a_budget_without_one() -> None:
    store = KVStore.from_bytes(SPEC, 3 * SPEC.bytes_per_block + SPEC.bytes_per_block // 2)
    assert store.num_blocks == 3 and store.num_bytes == 3 * SPEC.bytes_per_block
    assert store.kv.shape == (3, *SPEC.block_shape) and store.kv.dtype == torch.bfloat16
    assert (
        store.k_cache(1).shape == (3, 4, 2, 8)
        and store.v_cache(1).stride() == store.k_cache(1).stride()
    )
    with pytest.raises(ValueError, match=r"\d+ bytes hold no block of \d+ bytes"):
        KVStore.from_bytes(SPEC, SPEC.bytes_per_block - 1)


@pytest.mark.skipif(can_pin_memory(), reason="checks the CPU-only refusal")
def test_pinning_without_cuda_is_refused_and_the_default_does_not_pin() -> None:
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        KVStore(SPEC, 2, pin_memory=True)
    assert not KVStore(SPEC, 2).is_pinned  # pin_memory=None: pins only with CUDA


def test_pinned_empty_registers_exactly_its_bytes_and_unregisters_after_the_last_view() -> None:
    calls: list[tuple[str, int, int]] = []

    def register(ptr: int, nbytes: int) -> bool:
        calls.append(("register", ptr, nbytes))
        return True

    def unregister(ptr: int) -> None:
        calls.append(("unregister", ptr, 0))

    t, exact = pinned_empty((5, 3, 7), torch.bfloat16, register=register, unregister=unregister)
    assert exact and t.shape == (5, 3, 7) and t.dtype == torch.bfloat16
    assert calls == [("register", t.data_ptr(), 5 * 3 * 7 * 2)]  # exact size, no rounding
    assert t.data_ptr() % 4096 == 0  # page-aligned
    t.fill_(1.5)
    view = t[2]
    del t
    gc.collect()
    assert len(calls) == 1  # a view still uses the memory: still registered
    assert bool((view == 1.5).all())
    del view
    gc.collect()
    assert calls[-1][0] == "unregister" and calls[-1][1] == calls[0][1]


@pytest.mark.gpu
def test_gpu_host_tier_is_pinned_exactly_and_copies_round_trip() -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
    host = KVStore(spec, 37)  # pin_memory=None: pinned, exactly 37 blocks of bytes
    assert host.is_pinned and host.kv.is_pinned() and host.num_bytes == 37 * spec.bytes_per_block
    gpu = KVStore(spec, 8, device="cuda")
    gpu.kv.normal_()
    engine = CopyTransferEngine(gpu, host)
    handle = engine.submit("offload", [1, 5, 6], [30, 2, 3])
    handle.wait()
    assert not handle.failed
    gpu2 = KVStore(spec, 8, device="cuda", fill=0.0)
    engine2 = CopyTransferEngine(gpu2, host)
    back = engine2.submit("restore", [30, 2, 3], [0, 1, 2])
    back.wait()
    assert torch.equal(gpu2.kv[:3].view(torch.int16), gpu.kv[[1, 5, 6]].view(torch.int16))
    engine.synchronize()
    engine2.synchronize()
