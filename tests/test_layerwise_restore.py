"""Layer-wise restores in the runtime: a copy signalled per layer (`TransferHandle.
wait_layer`), plans handed out while the copy runs, the model waiting per layer, the
commit after the forward, and a failed copy recomputed."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
import weakref
from typing import Any

import pytest
import torch
from engine_helpers import TOK, greedy, reference, run_conversations
from tier_helpers import SPEC

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel
from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.scheduler.errors import SessionError
from pagedkv.scheduler.scheduler import SessionScheduler
from pagedkv.serving.conversation import Message, render_prompt
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import EngineConfig, EngineRequest, TurnDone
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.tiers import transfer
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import (
    CopyTransferEngine,
    FaultInjectingEngine,
    TransferEngine,
    TransferHandle,
)

BS = SPEC.block_size
L = SPEC.num_layers


def _stores(n_gpu: int = 8, n_host: int = 8) -> tuple[KVStore, KVStore]:
    gpu = KVStore(SPEC, n_gpu, fill=float("nan"))
    host = KVStore(SPEC, n_host, fill=0.0)
    for b in range(n_host):
        host.kv[b] = torch.randn(host.kv[b].shape)
    return gpu, host


# -- the engine's layered copy -----------------------------------------------------------------


def test_a_layered_copy_signals_each_layer_once_its_bytes_are_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu, host = _stores()
    engine = CopyTransferEngine(gpu, host)
    src, dst = [0, 1, 2, 5], [3, 4, 5, 0]
    gate = threading.Event()
    real_copy = transfer._host_copy
    copied_layers: list[int] = []
    layer_bytes = gpu.kv.stride(1) * gpu.kv.element_size()

    # hold the copy thread before layer 1 so the test sees layer 0 done and layer 1 not
    def slow_copy(to: Any, frm: Any) -> None:
        layer = (to.ctypes.data - gpu.kv.data_ptr()) // layer_bytes % L
        if layer == 1:
            gate.wait(5)
        copied_layers.append(layer)
        real_copy(to, frm)

    monkeypatch.setattr(transfer, "_host_copy", slow_copy)
    try:
        handle = engine.submit("restore", src, dst, layered=True)
        assert handle.num_layers == L
        handle.wait_layer(0)
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(gpu.kv[d, 0], host.kv[s, 0])
        assert not handle.done()  # layer 1 is held back
        assert torch.isnan(gpu.kv[dst[0], 1]).all()
        gate.set()
        for layer in range(L):
            handle.wait_layer(layer)
            for s, d in zip(src, dst, strict=True):
                assert torch.equal(gpu.kv[d, layer], host.kv[s, layer])
        handle.wait()
        assert handle.done() and not handle.failed and handle.error is None
    finally:
        gate.set()
    assert sorted(set(copied_layers)) == list(range(L))
    assert copied_layers == sorted(copied_layers)  # layer by layer, in order


def test_layered_copy_inputs_are_checked_before_anything_moves() -> None:
    gpu, host = _stores()
    engine = CopyTransferEngine(gpu, host)
    before = gpu.kv.clone()
    with pytest.raises(ValueError, match="src block ids"):
        engine.submit("restore", [0, 99], [1, 2], layered=True)
    with pytest.raises(ValueError, match="repeat"):
        engine.submit("restore", [0, 1], [2, 2], layered=True)
    with pytest.raises(ValueError, match="differ in length"):
        engine.submit("restore", [0, 1], [2], layered=True)
    engine.synchronize()
    assert torch.equal(gpu.kv.nan_to_num(7.0), before.nan_to_num(7.0))
    handle = engine.submit("restore", [0], [1], layered=True)
    for bad in (-1, L, 1.5, True):
        with pytest.raises(ValueError, match="wait_layer"):
            handle.wait_layer(bad)  # type: ignore[arg-type]
    handle.wait()
    plain = engine.submit("restore", [2], [3])  # not layered: wait_layer waits it all
    assert plain.num_layers == 0
    plain.wait_layer(0)
    assert torch.equal(gpu.kv[3], host.kv[2])
    with pytest.raises(ValueError, match="layer_group"):
        CopyTransferEngine(gpu, host, layer_group=0)


def test_a_copy_error_on_the_copy_thread_fails_every_pair_and_releases_the_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu, host = _stores()
    engine = CopyTransferEngine(gpu, host)

    def broken(to: Any, frm: Any) -> None:
        raise RuntimeError("injected copy failure")

    monkeypatch.setattr(transfer, "_host_copy", broken)
    handle = engine.submit("restore", [0, 1], [2, 3], layered=True)
    for layer in range(L):
        handle.wait_layer(layer)  # returns: the failure is in the result, not a hang
    handle.wait()
    assert handle.done() and handle.failed == {0, 1}
    assert isinstance(handle.error, RuntimeError)


# -- the model waits per layer, in order -------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return build_model("tiny", seed=3)


def test_the_model_waits_for_each_layer_just_before_it_runs(model: LlamaModel) -> None:
    store = KVStore(model.config.kv_spec(16), 4)
    calls: list[int] = []
    seen_layers: list[int] = []
    real_k_cache = store.k_cache

    def k_cache(layer: int) -> torch.Tensor:
        seen_layers.append(layer)
        assert calls == list(range(layer + 1)), (calls, layer)  # waited for it first
        return real_k_cache(layer)

    store.k_cache = k_cache  # type: ignore[method-assign]
    batch = build_forward_batch(
        [SeqChunk([0, 1], 0, list(range(20)))], block_size=16, wait_layer=calls.append
    )
    model(batch, store)
    assert calls == list(range(model.config.num_layers)) == seen_layers


# -- scheduler: the plan comes with the copy, and is committed after the forward ---------------


def _tiered(n_gpu: int = 12, n_host: int = 16) -> tuple[TieredKVCache, KVStore, KVStore]:
    gpu, host = _stores(n_gpu, n_host)
    hasher = BlockHasher(block_size=BS, secret=b"lw")
    cache = TieredKVCache(
        BlockManager(BlockPool(n_gpu, name="gpu"), hasher),
        BlockManager(BlockPool(n_host, name="host"), hasher),
        CopyTransferEngine(gpu, host),
    )
    return cache, gpu, host


def _offloaded(layerwise: bool, engine: Any = None) -> tuple[SessionScheduler, KVStore]:
    cache, gpu, _host = _tiered()
    if engine is not None:
        cache = TieredKVCache(cache.gpu, cache.host, engine(cache.engine))
    cfg = SchedulerConfig(max_pinned_sessions=1, high_watermark=1.0, layerwise_restore=layerwise)
    sched = SessionScheduler(cache, cfg, clock=lambda: 0.0)
    sched.open_session("a")
    plan = sched.begin_turn("a", list(range(3 * BS)))
    assert plan is not None
    sched.mark_computed("a")
    sched.end_turn("a")
    sched.open_session("b")
    plan = sched.begin_turn("b", [7] * BS)  # the pin cap pushes a to the host
    assert plan is not None
    sched.mark_computed("b")
    sched.end_turn("b")
    cache.wait_all()
    sched.poll()
    assert cache.location("a") == "host"
    cache.gpu.pool.evict(cache.gpu.pool.num_cached)  # nothing of a left on the GPU
    sched.close_session("b")
    return sched, gpu


def test_a_layerwise_plan_is_handed_out_at_once_and_committed_after_the_forward() -> None:
    sched, _gpu = _offloaded(True)
    plan = sched.begin_turn("a", [1, 2, 3])
    assert plan is not None and plan.restore is not None  # no wait for the copy
    assert plan.compute_start == 3 * BS and plan.hit_host == 3 * BS
    assert sched.metrics.restores_layerwise == 1
    sched.check_invariants()
    with pytest.raises(SessionError, match="commit_restore"):
        sched.mark_computed("a")
    with pytest.raises(SessionError, match="commit_restore"):
        sched.append_tokens("a", [4])
    for layer in range(plan.restore.num_layers):
        plan.restore.wait_layer(layer)
    assert sched.commit_restore("a") == 3 * BS
    with pytest.raises(SessionError, match="no layer-wise restore"):
        sched.commit_restore("a")
    assert sched.cache.gpu.table("a").num_computed_tokens == 3 * BS
    sched.mark_computed("a")
    sched.end_turn("a")
    sched.check_invariants()
    assert sched.metrics.blocks_restored == 3


def test_a_restore_committed_by_poll_before_the_forward_is_reported_by_commit() -> None:
    sched, _gpu = _offloaded(True)
    plan = sched.begin_turn("a", [1, 2, 3])
    assert plan is not None and plan.restore is not None
    plan.restore.wait()
    assert sched.poll() == []  # no TurnReady: the plan is already out
    sched.check_invariants()
    assert sched.commit_restore("a") == 3 * BS
    sched.mark_computed("a")
    sched.end_turn("a")
    sched.check_invariants()


def test_without_layerwise_the_turn_waits_for_the_whole_copy() -> None:
    sched, _gpu = _offloaded(False)
    plan = sched.begin_turn("a", [1, 2, 3])
    assert plan is None  # the copy (synchronous on CPU) is committed by the next poll
    (ready,) = sched.poll()
    assert ready.plan.restore is None and ready.plan.compute_start == 3 * BS  # type: ignore[union-attr]


def _fail_nth_restore_pair(n: int) -> Any:
    """A `FaultInjectingEngine` around an engine failing the n-th restore pair it sees."""
    seen = [0]

    def fail(direction: str, src: int, dst: int) -> bool:
        if direction != "restore":
            return False
        seen[0] += 1
        return seen[0] == n

    return lambda inner: FaultInjectingEngine(inner, fail)


def test_a_failed_layerwise_copy_reports_the_valid_prefix_and_moves_the_hits() -> None:
    sched, _gpu = _offloaded(True, engine=_fail_nth_restore_pair(2))
    computed_before = sched.metrics.tokens_computed
    plan = sched.begin_turn("a", [1, 2, 3])
    assert plan is not None and plan.restore is not None
    assert sched.commit_restore("a") == BS  # block 0 moved; 1 failed, so 2 is not trusted
    assert sched.metrics.restores_layerwise_failed == 1
    assert sched.metrics.tokens_computed - computed_before == plan.num_computed + 2 * BS
    table = sched.cache.gpu.table("a")
    assert table.num_computed_tokens == BS and table.num_tokens == 3 * BS + 3
    sched.mark_computed("a")  # the runner computed the rest again
    sched.end_turn("a")
    sched.check_invariants()


def test_closing_a_session_with_its_restore_uncommitted_releases_everything() -> None:
    sched, _gpu = _offloaded(True)
    plan = sched.begin_turn("a", [1, 2, 3])
    assert plan is not None and plan.restore is not None
    sched.close_session("a", offload=False)
    sched.cache.wait_all()
    sched.poll()
    sched.check_invariants()
    assert sched.cache.location("a") is None
    assert sched.cache.gpu.pool.num_in_use == 0


# -- the engine: outputs are bit-identical to a whole restore and to a recompute ---------------


def _every_third() -> Any:
    seen = [0]

    def fail(direction: str, src: int, dst: int) -> bool:
        seen[0] += direction == "restore"
        return direction == "restore" and seen[0] % 3 == 0

    return fail


@pytest.mark.parametrize("fail", [False, True])
def test_layerwise_restores_give_the_same_outputs(model: LlamaModel, fail: bool) -> None:
    """Sessions pushed to the host come back through layer-wise restores (the step runs
    while the copy thread is copying, layer by layer); every output equals a whole
    restore's and a recompute's, also when every third restored block fails."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = {}
        for layerwise in (False, True):
            engine = build_engine(
                model,
                num_gpu_blocks=24,
                num_host_blocks=96,
                scheduler=SchedulerConfig(max_pinned_sessions=2, layerwise_restore=layerwise),
            )
            if fail:
                engine.cache.engine = FaultInjectingEngine(engine.cache.engine, _every_third())  # type: ignore[arg-type]
            outputs[layerwise] = run_conversations(engine, model)
            m = engine.scheduler.metrics
            assert m.blocks_restored > 0
            assert (m.restores_layerwise > 0) == layerwise
            assert (m.restores_layerwise_failed > 0) == (fail and layerwise)
        assert outputs[True] == outputs[False]
    finally:
        torch.set_num_threads(threads)


def test_a_model_that_skips_wait_layer_is_caught_and_its_steps_computed_again(
    model: LlamaModel, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party model that ignores `ForwardBatch.wait_layer` reads blocks still
    being copied in (the copy thread is slowed so it would): the engine sees that not
    every layer was waited for, computes the step again and turns layer-wise off."""

    class Ignores:  # a PagedModel written before wait_layer existed
        config = model.config
        device = model.device

        def __call__(self, batch: Any, kv_store: KVStore) -> torch.Tensor:
            return model(dataclasses.replace(batch, wait_layer=None), kv_store)

    real_copy = transfer._host_copy

    def slow_copy(to: Any, frm: Any) -> None:
        time.sleep(0.003)
        real_copy(to, frm)

    engine = Engine(
        Ignores(),  # type: ignore[arg-type]
        EngineConfig(num_gpu_blocks=24, num_host_blocks=96,
                     scheduler=SchedulerConfig(max_pinned_sessions=2, layerwise_restore=True)),
    )  # fmt: skip
    monkeypatch.setattr(transfer, "_host_copy", slow_copy)
    with caplog.at_level(logging.WARNING, logger="pagedkv.engine"):
        run_conversations(engine, model)  # every output equals a recompute's
    assert engine.scheduler.metrics.restores_layerwise >= 1
    assert not engine.scheduler.config.layerwise_restore
    assert "does not call ForwardBatch.wait_layer" in caplog.text


class _GatedLayers(TransferEngine):
    """Wraps the engine's copies: a layered copy is not done until `gate` opens, and a
    layer wait before that is recorded in `early` (then opens it, so nothing hangs)."""

    supports_layers = True

    def __init__(self, inner: CopyTransferEngine) -> None:
        self.inner, self.gate, self.early = inner, threading.Event(), []
        self.gpu, self.host = inner.gpu, inner.host

    def submit(self, direction: Any, src_ids: list[int], dst_ids: list[int], *,
               layered: bool = False) -> TransferHandle:  # fmt: skip
        if not layered:
            return self.inner.submit(direction, src_ids, dst_ids)
        inner = self.inner.submit(direction, src_ids, dst_ids, layered=True)
        outer = TransferHandle(direction, list(src_ids), list(dst_ids), num_layers=inner.num_layers)

        def early(layer: int) -> None:
            if not self.gate.is_set():
                self.early.append(layer)
                self.gate.set()

        def wait_layer(layer: int) -> None:
            early(layer)
            inner.wait_layer(layer)

        def wait() -> None:
            early(-1)
            inner.wait()
            outer.failed, outer.error = inner.failed, inner.error

        def done() -> bool:
            if self.gate.is_set() and inner.done():
                outer.failed, outer.error = inner.failed, inner.error
                return True
            return False

        outer._poll, outer._wait, outer._wait_layer = done, wait, wait_layer
        return outer


def test_a_restoring_turn_does_not_stall_running_decodes(model: LlamaModel) -> None:
    """While a session decodes, a returning session whose copy (as the cost model
    expects it) is far from done waits out of the batch instead of making the decodes'
    step wait on its layers; it joins once its copy is done."""
    engine = build_engine(
        model, num_gpu_blocks=40, num_host_blocks=96,
        scheduler=SchedulerConfig(max_pinned_sessions=1, layerwise_restore=True),
    )  # fmt: skip
    gated = _GatedLayers(engine.cache.engine)  # type: ignore[arg-type]
    engine.cache.engine = gated
    cost = engine.scheduler.cost
    engine.scheduler.cost = dataclasses.replace(cost, gpu_flops=1e6)  # offload, never drop
    prompt_a = render_prompt(TOK, instructions=None, tools=(), items=[Message("user", "a " * 30)])
    prompt_b = render_prompt(TOK, instructions=None, tools=(), items=[Message("user", "b " * 30)])
    events: dict[str, list[Any]] = {"a1": [], "a2": [], "b": []}
    engine.open_session("a")
    engine.submit(EngineRequest(request_id="a1", session_id="a", prompt_tokens=tuple(prompt_a),
                                output=greedy(4)), events["a1"].append)  # fmt: skip
    engine.run_until_idle()
    first = events["a1"][-1]
    assert isinstance(first, TurnDone) and first.item is not None
    engine.open_session("b")  # the only pin slot: a goes to the host tier
    engine.submit(EngineRequest(request_id="bx", session_id="b", prompt_tokens=tuple(prompt_b),
                                output=greedy(1)), lambda ev: None)  # fmt: skip
    engine.run_until_idle()
    engine.cache.wait_all()
    engine.run_until_idle()
    assert engine.scheduler.session(engine._sessions["a"].key).state.value == "offloaded"
    engine.cache.gpu.pool.evict(engine.cache.gpu.pool.num_cached)
    engine.scheduler.set_max_pinned_sessions(2)
    # a copy that (the engine expects) takes far longer than any step
    engine.scheduler.cost = dataclasses.replace(cost, host_link_bytes_per_s=1e3)
    items = [Message("user", "a " * 30), first.item, Message("user", "again " * 3)]
    prompt_a2 = render_prompt(TOK, instructions=None, tools=(), items=items)
    b_items = [Message("user", "b " * 30)]
    prompt_b2 = render_prompt(TOK, instructions=None, tools=(), items=b_items)
    deltas = [0]

    def on_b(ev: Any) -> None:
        events["b"].append(ev)
        if type(ev).__name__ == "OutputDelta":
            deltas[0] += 1
            if deltas[0] == 1:  # b decodes: now a comes back
                engine.submit(EngineRequest(request_id="a2", session_id="a",
                                            prompt_tokens=tuple(prompt_a2), output=greedy(4)),
                              events["a2"].append)  # fmt: skip
            if deltas[0] == 12:
                gated.gate.set()  # the copy is done from here on

    engine.submit(EngineRequest(request_id="b2", session_id="b", prompt_tokens=tuple(prompt_b2),
                                output=greedy(24)), on_b)  # fmt: skip
    engine.run_until_idle()
    done_a = events["a2"][-1]
    assert isinstance(done_a, TurnDone), events["a2"]
    assert done_a.item == reference(model, prompt_a2, greedy(4))[1]
    assert engine.scheduler.metrics.restores_layerwise == 1
    assert gated.early == []  # no step waited on the copy while b was decoding
    assert deltas[0] >= 12


def test_a_closed_or_dropped_copy_engine_keeps_no_store_alive() -> None:
    gpu, host = _stores()
    engine = CopyTransferEngine(gpu, host)
    engine.submit("restore", [0, 1], [2, 3], layered=True).wait()
    ref = weakref.ref(gpu.kv)
    del gpu, engine
    gc.collect()
    assert ref() is None  # the copy thread holds nothing of a finished job
    gpu, host = _stores()
    engine = CopyTransferEngine(gpu, host)
    handle = engine.submit("restore", [0, 1], [2, 3], layered=True)
    engine.close()
    assert handle.done() and torch.equal(gpu.kv[2], host.kv[0])
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("restore", [0], [1], layered=True)
    engine.close()  # idempotent


@pytest.mark.gpu
def test_a_layered_copy_on_cuda_is_ordered_by_stream_events() -> None:
    gpu = KVStore(SPEC, 8, device="cuda", fill=float("nan"))
    host = KVStore(SPEC, 8, fill=0.0)
    host.kv.copy_(torch.randn(host.kv.shape))
    engine = CopyTransferEngine(gpu, host)
    handle = engine.submit("restore", [0, 1, 2, 7], [4, 5, 6, 0], layered=True)
    out = []
    for layer in range(handle.num_layers):
        handle.wait_layer(layer)  # the current stream waits; reads after it are ordered
        out.append(gpu.kv[[4, 5, 6, 0], layer].clone())
    torch.cuda.synchronize()
    for layer, got in enumerate(out):
        assert torch.equal(got.cpu(), host.kv[[0, 1, 2, 7], layer])
    assert handle.done() and not handle.failed
