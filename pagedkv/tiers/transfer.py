"""Transfer engines: move whole blocks between the GPU and host tiers.

Three engines behind one interface:
- `CopyTransferEngine`: real copies with `pagedkv.kernels.copy_blocks`. On CUDA they run on a
  side stream per direction (offloads and backups on one, restores on the other, so a
  restore a turn waits for never queues behind write-backs, and both PCIe directions
  are used at once), ordered after the work already queued on the compute stream (an
  event), and the handle polls a completion event: the compute stream is never
  blocked. On CPU the copy happens synchronously inside `submit`.
- `SimulatedTransferEngine`: no tensors; a handle completes when the injected clock
  reaches `ready_at`, from a latency + bandwidth model with one link per direction.
- `FaultInjectingEngine`: wraps another engine and fails chosen pairs (tests).

A handle reports which pairs (positions in the submitted lists) were not moved.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

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
    """

    direction: Direction
    src_ids: list[int]
    dst_ids: list[int]
    ready_at: float | None = None
    failed: set[int] = field(default_factory=set)
    error: BaseException | None = None
    _poll: Callable[[], bool] = field(default=lambda: True, repr=False)
    _wait: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.src_ids)

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

    @abstractmethod
    def submit(
        self, direction: Direction, src_ids: list[int], dst_ids: list[int]
    ) -> TransferHandle:
        """Start copying `src[src_ids[i]] -> dst[dst_ids[i]]` and return a handle.

        Raises:
            ValueError: the id lists differ in length.
        """


def _check_pairs(src_ids: list[int], dst_ids: list[int]) -> None:
    if len(src_ids) != len(dst_ids):
        raise ValueError(
            f"transfer: src_ids and dst_ids differ in length: {len(src_ids)} != {len(dst_ids)}"
        )


class CopyTransferEngine(TransferEngine):
    """Real copies between a GPU (or CPU) `KVStore` and a host `KVStore`.

    Args:
        gpu: the device tier's store.
        host: the host tier's store (pinned when CUDA is present, for async DMA).
    """

    def __init__(self, gpu: KVStore, host: KVStore, *, allow_pageable: bool = False) -> None:
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
        self.gpu = gpu
        self.host = host
        self._streams: dict[str, torch.cuda.Stream] = (
            {
                direction: torch.cuda.Stream(device=gpu.device)  # type: ignore[no-untyped-call]
                for direction in ("offload", "restore")
            }
            if self._cuda
            else {}
        )

    def synchronize(self) -> None:
        """Block until every copy submitted so far has finished (e.g. before the stores
        are freed: a copy still in flight would write into reused memory)."""
        for stream in self._streams.values():
            stream.synchronize()

    def submit(
        self, direction: Direction, src_ids: list[int], dst_ids: list[int]
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
        self, direction: Direction, src_ids: list[int], dst_ids: list[int]
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

    def submit(
        self, direction: Direction, src_ids: list[int], dst_ids: list[int]
    ) -> TransferHandle:
        _check_pairs(src_ids, dst_ids)
        bad = {
            i
            for i, (s, d) in enumerate(zip(src_ids, dst_ids, strict=True))
            if self.fail(direction, s, d)
        }
        keep = [i for i in range(len(src_ids)) if i not in bad]
        inner = self.inner.submit(direction, [src_ids[i] for i in keep], [dst_ids[i] for i in keep])
        handle = TransferHandle(
            direction, list(src_ids), list(dst_ids), ready_at=inner.ready_at, failed=set(bad)
        )

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
