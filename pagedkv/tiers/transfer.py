"""Transfer engines: move whole blocks between the GPU and host tiers.

Three engines behind one interface:
- `CopyTransferEngine`: real copies with `pagedkv.kernels.copy_blocks`. On CUDA they run on a
  side stream per direction (offloads and backups on one, restores on the other, so a
  restore a turn waits for never queues behind write-backs, and both PCIe directions
  are used at once), ordered after the work already queued on the compute stream (an
  event), and the handle polls a completion event: the compute stream is never
  blocked. On CPU the copy happens synchronously inside `submit`.
  A *layered* copy (`submit(..., layered=True)`, for restores a prefill overlaps) moves
  the blocks layer by layer and signals each layer on its own: `handle.wait_layer(i)`
  returns once layer i of every pair is in place (CPU: a copy thread sets one
  `threading.Event` per layer) or, on CUDA, makes the current stream wait for that
  layer's event (the host never blocks). So a forward that waits for layer i just
  before reading it computes layer i while layer i+1 is still being copied.
- `SimulatedTransferEngine`: no tensors; a handle completes when the injected clock
  reaches `ready_at`, from a latency + bandwidth model with one link per direction.
- `FaultInjectingEngine`: wraps another engine and fails chosen pairs (tests).

A handle reports which pairs (positions in the submitted lists) were not moved.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from pagedkv.tiers.kv_store import KVStore

Direction = Literal["offload", "restore"]  # offload: gpu -> host; restore: host -> gpu


@dataclass(eq=False)
class TransferHandle:
    """One submitted batch of block copies.

    Attributes:
        direction: "offload" (gpu -> host) or "restore" (host -> gpu).
        src_ids, dst_ids: block ids in the source and destination tiers.
        ready_at: simulated completion time (None for real engines).
        failed: positions of pairs that were not moved (meaningful once `done()`).
        error: the exception that failed the batch, if one did.
        num_layers: layers signalled one by one (`wait_layer`); 0 for a copy that is
            signalled only as a whole.
    """

    direction: Direction
    src_ids: list[int]
    dst_ids: list[int]
    ready_at: float | None = None
    failed: set[int] = field(default_factory=set)
    error: BaseException | None = None
    num_layers: int = 0
    _poll: Callable[[], bool] = field(default=lambda: True, repr=False)
    _wait: Callable[[], None] = field(default=lambda: None, repr=False)
    _wait_layer: Callable[[int], None] | None = field(default=None, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.src_ids)

    def wait_layer(self, layer: int) -> None:
        """Make layer `layer` of every pair safe to read: on CUDA the current stream
        waits for that layer's copy (the host does not block); on CPU this blocks until
        it is in place. A copy that is not layered waits for the whole copy. After a
        failure the call returns too; the copy's result (`failed`) says what is valid.

        Raises:
            ValueError: `layer` is outside a layered copy's layers.
            RuntimeError: a simulated handle cannot be waited on (advance the clock).
        """
        if self._wait_layer is None:
            self._wait()
            return
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not 0 <= layer < self.num_layers
        ):
            raise ValueError(
                f"wait_layer: layer must be an int in [0, {self.num_layers}), got {layer!r}"
            )
        self._wait_layer(layer)

    def done(self) -> bool:
        """Whether the copies have finished (successfully or not). Never blocks."""
        return self._poll()

    def wait(self) -> None:
        """Block until the copies have finished.

        Raises:
            RuntimeError: a simulated handle cannot be waited on (advance the clock).
        """
        self._wait()


class TransferEngine(ABC):
    """Moves lists of whole blocks between tiers; see the module docstring."""

    #: whether `submit(..., layered=True)` signals layers one by one (else it is ignored)
    supports_layers: bool = False

    @abstractmethod
    def submit(
        self,
        direction: Direction,
        src_ids: list[int],
        dst_ids: list[int],
        *,
        layered: bool = False,
    ) -> TransferHandle:
        """Start copying `src[src_ids[i]] -> dst[dst_ids[i]]` and return a handle.

        `layered` asks for a copy signalled layer by layer (`TransferHandle.wait_layer`)
        where the engine `supports_layers`; other engines copy as usual.

        Raises:
            ValueError: the id lists differ in length.
        """


def _check_pairs(src_ids: list[int], dst_ids: list[int]) -> None:
    if len(src_ids) != len(dst_ids):
        raise ValueError(
            f"transfer: src_ids and dst_ids differ in length: {len(src_ids)} != {len(dst_ids)}"
        )


_IDLE_EXIT_S = 5.0  # a copy thread with nothing to do for this long exits
_EXIT_WAIT_S = 30.0  # at interpreter exit, how long copies in flight are waited for


class _LayerCopier:
    """The copy thread of CPU layered copies: jobs run in submission order, layer by
    layer, each layer's `threading.Event` set as soon as it is in place (`_host_copy`
    runs without the GIL, so the engine thread computes meanwhile). The thread starts on the
    first job and exits after `_IDLE_EXIT_S` without one, holding nothing of a finished
    job (its stores can be freed); at interpreter exit the copies in flight are waited
    for (a torch op still running on a thread at exit aborts the process)."""

    _live: ClassVar[weakref.WeakSet[_LayerCopier]] = weakref.WeakSet()
    _atexit_registered: ClassVar[bool] = False

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._outstanding: list[threading.Event] = []
        self._closed = False
        _LayerCopier._live.add(self)
        if not _LayerCopier._atexit_registered:
            atexit.register(_LayerCopier._wait_all_at_exit)
            _LayerCopier._atexit_registered = True

    def put(self, job: Callable[[], None], done: threading.Event) -> None:
        """Queue a job (it must catch its own errors and set `done` at its end)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("CopyTransferEngine is closed")
            self._outstanding = [e for e in self._outstanding if not e.is_set()]
            self._outstanding.append(done)
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pagedkv-layer-copy", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:  # exit unless a job came in meanwhile
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            if job is None:
                return
            job()  # a job catches its own errors and always sets its events
            del job  # the finished job's closure (stores, handle) is not kept alive

    def synchronize(self, timeout: float | None = None) -> bool:
        """Wait for every job queued so far; False if `timeout` passed first."""
        with self._lock:
            pending = list(self._outstanding)
        return all(done.wait(timeout) for done in pending)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the queued jobs, then stop the thread; later `put`s raise."""
        self.synchronize(timeout)
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
        if thread is not None:
            thread.join(timeout)

    @staticmethod
    def _wait_all_at_exit() -> None:
        for copier in list(_LayerCopier._live):
            copier.synchronize(_EXIT_WAIT_S)


class CopyTransferEngine(TransferEngine):
    """Real copies between a GPU (or CPU) `KVStore` and a host `KVStore`.

    Args:
        gpu: the device tier's store.
        host: the host tier's store (pinned when CUDA is present, for async DMA).
        allow_pageable: accept a pageable host store next to a CUDA one.
        layer_group: layers signalled together by a layered copy (None: 1 on CPU; on
            CUDA enough for at most 8 events, because each block's layers of a group
            are one contiguous memcpy, so a layered copy issues blocks x groups copies).
    """

    supports_layers = True

    def __init__(
        self,
        gpu: KVStore,
        host: KVStore,
        *,
        allow_pageable: bool = False,
        layer_group: int | None = None,
    ) -> None:
        import torch

        if gpu.kv.shape[1:] != host.kv.shape[1:] or gpu.kv.dtype != host.kv.dtype:
            raise ValueError(
                f"CopyTransferEngine: per-block layouts differ: gpu {tuple(gpu.kv.shape[1:])} "
                f"{gpu.kv.dtype} vs host {tuple(host.kv.shape[1:])} {host.kv.dtype}"
            )
        self._cuda = gpu.device.type == "cuda"
        if self._cuda and host.device.type == "cpu" and not host.is_pinned and not allow_pageable:
            raise ValueError(
                "CopyTransferEngine: the host store is pageable; copies to and from it are "
                "synchronous and would block the host thread (allocate it with "
                "pin_memory=None/True, or pass allow_pageable=True)"
            )
        num_layers = int(gpu.kv.shape[1])
        if layer_group is None:
            layer_group = -(-num_layers // 8) if self._cuda else 1
        if isinstance(layer_group, bool) or not isinstance(layer_group, int) or layer_group < 1:
            raise ValueError(
                f"CopyTransferEngine: layer_group must be an int >= 1 or None, got {layer_group!r}"
            )
        self.gpu = gpu
        self.host = host
        self.num_layers = num_layers
        self.layer_group = min(layer_group, num_layers)
        self._streams: dict[str, torch.cuda.Stream] = (
            {
                direction: torch.cuda.Stream(device=gpu.device)  # type: ignore[no-untyped-call]
                for direction in ("offload", "restore")
            }
            if self._cuda
            else {}
        )
        self._copier = _LayerCopier()

    def synchronize(self) -> None:
        """Block until every copy submitted so far has finished (e.g. before the stores
        are freed: a copy still in flight would write into reused memory)."""
        for stream in self._streams.values():
            stream.synchronize()
        self._copier.synchronize()

    def close(self, timeout: float | None = None) -> None:
        """Finish every copy submitted so far and stop the CPU copy thread (idempotent;
        a layered copy submitted afterwards raises `RuntimeError`)."""
        for stream in self._streams.values():
            stream.synchronize()
        self._copier.close(timeout)

    def _groups(self) -> list[tuple[int, int]]:
        g = self.layer_group
        return [(lo, min(lo + g, self.num_layers)) for lo in range(0, self.num_layers, g)]

    def submit(
        self,
        direction: Direction,
        src_ids: list[int],
        dst_ids: list[int],
        *,
        layered: bool = False,
    ) -> TransferHandle:
        import torch

        from pagedkv.kernels import copy_blocks

        _check_pairs(src_ids, dst_ids)
        src, dst = (
            (self.gpu.kv, self.host.kv) if direction == "offload" else (self.host.kv, self.gpu.kv)
        )
        handle = TransferHandle(direction, list(src_ids), list(dst_ids))
        if not src_ids:
            return handle
        if layered:
            _check_ids(src, src_ids, "src")
            _check_ids(dst, dst_ids, "dst")
            return self._submit_layered(handle, src, dst)
        side = self._streams.get(direction)
        if side is None:
            # CPU: one synchronous batch; a failure fails every pair of it
            try:
                copy_blocks(src, dst, src_ids, dst_ids)
            except (RuntimeError, ValueError, TypeError) as exc:
                handle.failed = set(range(len(src_ids)))
                handle.error = exc
            return handle
        # CUDA: order after everything already queued on the current (compute) stream at
        # submit time (the K/V being offloaded was written there; a caller that writes K/V
        # on another stream must submit under that stream), copy on the side stream, and
        # poll an event.
        compute = torch.cuda.current_stream(self.gpu.device)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(compute)
        finished = torch.cuda.Event()  # type: ignore[no-untyped-call]
        with torch.cuda.stream(side):
            side.wait_event(ready)
            try:
                copy_blocks(src, dst, src_ids, dst_ids, non_blocking=True)
            except (RuntimeError, ValueError, TypeError) as exc:
                handle.failed = set(range(len(src_ids)))
                handle.error = exc
            finished.record(side)
        handle._poll = finished.query
        handle._wait = finished.synchronize
        return handle

    def _submit_layered(self, handle: TransferHandle, src: Any, dst: Any) -> TransferHandle:
        """A copy signalled per layer group (see the module docstring)."""
        import torch

        from pagedkv.kernels.copy import plan_runs

        runs = plan_runs(
            torch.tensor(handle.src_ids, dtype=torch.int64),
            torch.tensor(handle.dst_ids, dtype=torch.int64),
        )
        groups = self._groups()
        group_of = [gi for gi, (lo, hi) in enumerate(groups) for _ in range(lo, hi)]
        handle.num_layers = self.num_layers
        side = self._streams.get(handle.direction)
        if side is None:
            events = [threading.Event() for _ in groups]
            done = threading.Event()

            src_words, dst_words = _as_numpy(src), _as_numpy(dst)

            def job() -> None:
                try:
                    for event, (lo, hi) in zip(events, groups, strict=True):
                        for s, d, n in zip(*runs, strict=True):
                            _host_copy(dst_words[d : d + n, lo:hi], src_words[s : s + n, lo:hi])
                        event.set()
                except Exception as exc:  # e.g. out of memory: nothing it moved is trusted
                    handle.error = exc
                    handle.failed = set(range(handle.num_blocks))
                finally:
                    for event in events:
                        event.set()
                    done.set()

            def wait() -> None:
                done.wait()

            def wait_layer(layer: int) -> None:
                events[group_of[layer]].wait()

            handle._poll = done.is_set
            handle._wait = wait
            handle._wait_layer = wait_layer
            self._copier.put(job, done)
            return handle
        compute = torch.cuda.current_stream(self.gpu.device)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(compute)
        cuda_events = [torch.cuda.Event() for _ in groups]  # type: ignore[no-untyped-call]
        with torch.cuda.stream(side):
            side.wait_event(ready)
            try:
                for event, (lo, hi) in zip(cuda_events, groups, strict=True):
                    # one block's layers lo:hi are contiguous on both sides: an async DMA
                    # each (a strided slice over several blocks would be staged by torch)
                    for s, d, n in zip(*runs, strict=True):
                        for i in range(n):
                            dst[d + i, lo:hi].copy_(src[s + i, lo:hi], non_blocking=True)
                    event.record(side)
            except (RuntimeError, ValueError, TypeError) as exc:
                handle.failed = set(range(handle.num_blocks))
                handle.error = exc
                for event in cuda_events:
                    event.record(side)
        finished = cuda_events[-1]
        device = self.gpu.device
        handle._poll = finished.query
        handle._wait = finished.synchronize
        handle._wait_layer = lambda layer: torch.cuda.current_stream(device).wait_event(
            cuda_events[group_of[layer]]
        )
        return handle


def _as_numpy(t: Any) -> Any:
    """A CPU tensor as a NumPy array of same-width integers (a view: bf16 and fp8 have no
    NumPy dtype, and only the bytes are copied)."""
    from pagedkv.kernels.copy import _INT_VIEW

    return t.view(_INT_VIEW[t.element_size()]).numpy()


def _host_copy(dst: Any, src: Any) -> None:
    """The CPU copy thread's copy: one NumPy `copyto` on one thread, without the GIL. A
    torch `copy_` there would start its own OpenMP team next to the forward's, and on a
    machine with few cores both slow down: `benchmarks/bench_layerwise_restore.py` on a
    2-core CPU measured the layered restore 108 ms over the pinned floor with torch's
    copy here, against 11 ms for a whole restore, and 13-37 ms with this one."""
    np.copyto(dst, src)


def _check_ids(pool: Any, ids: Sequence[int], name: str) -> None:
    """Block ids of a layered copy (checked here: the copy thread cannot raise)."""
    n = int(pool.shape[0])
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"transfer: {name} block ids must be ints in [0, {n}), got {bad[:4]}")
    if name == "dst" and len(set(ids)) != len(ids):
        raise ValueError("transfer: dst block ids repeat (a block would be written twice)")


class SimulatedTransferEngine(TransferEngine):
    """Completion times from a model: `latency + num_blocks * bytes_per_block / bandwidth`.

    Each direction is one link: a batch starts when the previous batch on that link ends.

    Args:
        bytes_per_block: bytes moved per block.
        bandwidth_bytes_per_s: link bandwidth per direction.
        latency_s: fixed cost per batch.
        clock: returns the current (virtual) time in seconds.
    """

    def __init__(
        self,
        *,
        bytes_per_block: int,
        bandwidth_bytes_per_s: float,
        latency_s: float = 10e-6,
        clock: Callable[[], float],
    ) -> None:
        if bytes_per_block <= 0 or bandwidth_bytes_per_s <= 0 or latency_s < 0:
            raise ValueError(
                "SimulatedTransferEngine: need bytes_per_block > 0, bandwidth > 0, latency >= 0; "
                f"got {bytes_per_block}, {bandwidth_bytes_per_s}, {latency_s}"
            )
        self.bytes_per_block = bytes_per_block
        self.bandwidth = bandwidth_bytes_per_s
        self.latency_s = latency_s
        self.clock = clock
        self._link_free_at: dict[str, float] = {"offload": 0.0, "restore": 0.0}

    def duration(self, num_blocks: int) -> float:
        """Modelled seconds to move `num_blocks` in one batch."""
        return self.latency_s + num_blocks * self.bytes_per_block / self.bandwidth

    def submit(
        self,
        direction: Direction,
        src_ids: list[int],
        dst_ids: list[int],
        *,
        layered: bool = False,
    ) -> TransferHandle:
        _check_pairs(src_ids, dst_ids)
        now = self.clock()
        if not src_ids:
            return TransferHandle(direction, [], [], ready_at=now)
        start = max(now, self._link_free_at[direction])
        ready_at = start + self.duration(len(src_ids))
        self._link_free_at[direction] = ready_at
        clock = self.clock

        def wait() -> None:
            raise RuntimeError(
                f"a simulated transfer completes when the clock reaches {ready_at:.6f}; "
                "advance the clock instead of waiting"
            )

        return TransferHandle(
            direction,
            list(src_ids),
            list(dst_ids),
            ready_at=ready_at,
            _poll=lambda: clock() >= ready_at,
            _wait=wait,
        )


class FaultInjectingEngine(TransferEngine):
    """Wraps an engine; pairs for which `fail(direction, src_id, dst_id)` is true are not
    copied and are reported in `handle.failed`, together with whatever the inner engine
    reports failed once its copy is done."""

    def __init__(self, inner: TransferEngine, fail: Callable[[str, int, int], bool]) -> None:
        self.inner = inner
        self.fail = fail

    @property
    def gpu(self) -> KVStore | None:
        """The inner engine's GPU store, if it has one (for pool-size checks)."""
        return getattr(self.inner, "gpu", None)

    @property
    def host(self) -> KVStore | None:
        """The inner engine's host store, if it has one."""
        return getattr(self.inner, "host", None)

    @property
    def supports_layers(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "supports_layers", False))

    def submit(
        self,
        direction: Direction,
        src_ids: list[int],
        dst_ids: list[int],
        *,
        layered: bool = False,
    ) -> TransferHandle:
        _check_pairs(src_ids, dst_ids)
        bad = {
            i
            for i, (s, d) in enumerate(zip(src_ids, dst_ids, strict=True))
            if self.fail(direction, s, d)
        }
        keep = [i for i in range(len(src_ids)) if i not in bad]
        kept_src, kept_dst = [src_ids[i] for i in keep], [dst_ids[i] for i in keep]
        inner = (
            self.inner.submit(direction, kept_src, kept_dst, layered=True)
            if layered and self.supports_layers
            else self.inner.submit(direction, kept_src, kept_dst)
        )
        handle = TransferHandle(
            direction,
            list(src_ids),
            list(dst_ids),
            ready_at=inner.ready_at,
            failed=set(bad),
            num_layers=inner.num_layers,
        )
        if inner.num_layers:
            handle._wait_layer = inner.wait_layer

        def settle() -> None:  # the inner result is meaningful only once it is done
            handle.failed = bad | {keep[i] for i in inner.failed}
            handle.error = inner.error

        def poll() -> bool:
            if not inner.done():
                return False
            settle()
            return True

        def wait() -> None:
            inner.wait()
            settle()

        handle._poll, handle._wait = poll, wait
        return handle
