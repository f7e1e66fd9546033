"""TieredKVCache: a GPU tier and a host tier of blocks, and the transfers between them.

- A sequence *on GPU* has a table in the GPU manager. *Offloading* copies its blocks to
  the host tier (blocks the host already holds by hash are shared, not copied twice);
  once the copy completes the host copies become findable and the GPU blocks are
  released (they stay findable on the GPU until reclaimed). An *offloaded* sequence has a
  table in the host manager, which keeps its host blocks referenced.
- *Restoring* (an offloaded sequence, or any token history via `begin_sequence`) takes
  GPU hits first, then host hits for the rest of the hash chain, copies those into new
  GPU blocks and registers them once the copy completes.
- While a copy is in flight its source blocks are referenced (cannot be reclaimed) and
  its destination blocks are unregistered (cannot be found or read by anyone else).
- A failed or cancelled copy keeps the longest correctly moved prefix, frees the rest,
  and reports how many tokens are valid, so the caller recomputes the remainder.

Metadata only: the bytes move in the `TransferEngine` (real or simulated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedkv.cache.block_manager import BlockManager, SeqId
from pagedkv.cache.errors import InvariantError, OutOfBlocksError
from pagedkv.cache.hashing import TokenInput, as_token_array
from pagedkv.tiers.results import Backup, Location, PrefixPlan, PrefixProbe, TransferResult
from pagedkv.tiers.transfer import TransferEngine, TransferHandle

if TYPE_CHECKING:  # the remote tier needs torch; the metadata layer does not
    from pagedkv.tiers.remote import RemoteKVTier


@dataclass(eq=False)
class _Pending:
    seq_id: SeqId
    handle: TransferHandle
    positions: list[int]  # table block index of each copied pair
    valid_end: int  # tokens of the destination table the copy makes valid (if all moved)
    held_host: list[int] = field(default_factory=list)  # host refs held for the copy
    held_gpu: list[int] = field(default_factory=list)  # GPU source refs held by a backup
    is_backup: bool = False
    cancelled: bool = False
    free_after: bool = False


class TieredKVCache:
    """Coordinates a GPU `BlockManager`, an optional host `BlockManager` and an engine.

    Both managers must share one `BlockHasher` (same chains on both tiers).

    Invariants (see `check_invariants`): each sequence is in exactly one location; a
    sequence has both a GPU and a host table only while a copy between them is in flight;
    pool refcounts equal table holders plus the references in-flight copies hold.
    """

    def __init__(
        self,
        gpu: BlockManager,
        host: BlockManager | None,
        engine: TransferEngine | None,
        *,
        remote: RemoteKVTier | None = None,
    ) -> None:
        if remote is not None and host is None:
            raise ValueError("TieredKVCache: a remote tier restores through a host tier")
        if remote is not None and remote.host_store.num_blocks < host.pool.num_blocks:  # type: ignore[union-attr]
            raise ValueError(
                "TieredKVCache: the remote tier's host store is smaller than the host pool"
            )
        if host is not None:
            if host.hasher is not gpu.hasher:
                raise ValueError("TieredKVCache: the GPU and host managers must share a hasher")
            if engine is None:
                raise ValueError("TieredKVCache: a host tier needs a transfer engine")
        for name, manager in (("gpu", gpu), ("host", host)):
            # CopyTransferEngine (or a wrapper that exposes it): the stores it copies
            store = getattr(engine, name, None)
            if manager is None or store is None:
                continue
            store_blocks = getattr(store, "num_blocks", None)
            if store_blocks is not None and manager.pool.num_blocks > store_blocks:
                raise ValueError(
                    f"TieredKVCache: the {name} pool has {manager.pool.num_blocks} blocks "
                    f"but the engine's {name} store holds only {store_blocks}"
                )
            spec = getattr(store, "spec", None)
            if spec is not None and spec.block_size != manager.block_size:
                raise ValueError(
                    f"TieredKVCache: the {name} manager has block_size {manager.block_size} "
                    f"but the engine's {name} store has block_size {spec.block_size}"
                )
        self.gpu = gpu
        self.host = host
        self.engine = engine
        self.remote = remote
        self.block_size = gpu.block_size
        self._pending: dict[SeqId, _Pending] = {}

    # ------------------------------------------------------------------ queries
    def location(self, seq_id: SeqId) -> Location | None:
        """Where a sequence is, or None when this cache does not hold it."""
        pending = self._pending.get(seq_id)
        if pending is not None:
            return "offloading" if pending.handle.direction == "offload" else "restoring"
        if seq_id in self.gpu:
            return "gpu"
        if self.host is not None and seq_id in self.host:
            return "host"
        return None

    def is_pending(self, seq_id: SeqId) -> bool:
        return seq_id in self._pending

    def pending_transfer(self, seq_id: SeqId) -> TransferHandle | None:
        """The copy in flight for `seq_id` (an offload, a restore or a `Backup`), or None."""
        pending = self._pending.get(seq_id)
        return None if pending is None else pending.handle

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def cached_prefix(
        self, tokens: TokenInput, *, tenant: str = "default", extra_keys: bytes = b""
    ) -> tuple[int, int]:
        """(GPU tokens, host tokens) of a prompt's longest cached prefix: the GPU hits,
        then the host blocks that continue the chain. Changes nothing."""
        probe = self.probe_prefix(tokens, tenant=tenant, extra_keys=extra_keys)
        k1 = len(probe.gpu_hits)
        k2 = 0
        if self.host is not None:
            rest = self.host.pool.match_chain(
                probe.hashes[k1:], probe.contents[k1:], len(probe.hashes)
            )
            k2 = len(rest)
        return k1 * self.block_size, k2 * self.block_size

    def probe_prefix(
        self, tokens: TokenInput, *, tenant: str = "default", extra_keys: bytes = b""
    ) -> PrefixProbe:
        """Plan a sequence's GPU reuse without changing anything: its hash chain (pass the
        probe to `begin_sequence` to avoid hashing twice) and the GPU blocks holding its
        longest cached prefix."""
        hasher = self.gpu.hasher
        hashes, contents = hasher.hash_chain(
            hasher.root(tenant, extra_keys), as_token_array(tokens), with_content=True
        )
        hits = self.gpu.pool.match_chain(hashes, contents, len(hashes))
        return PrefixProbe(hashes, contents, hits)

    def reprobe(self, probe: PrefixProbe) -> PrefixProbe:
        """`probe` with its GPU hits looked up again (the pool may have changed since);
        the chain itself depends only on the tokens, so it is not hashed again."""
        hits = self.gpu.pool.match_chain(probe.hashes, probe.contents, len(probe.hashes))
        return PrefixProbe(probe.hashes, probe.contents, hits)

    # ------------------------------------------------------------------ GPU sequences
    def begin_sequence(
        self,
        seq_id: SeqId,
        tokens: TokenInput,
        *,
        tenant: str = "default",
        extra_keys: bytes = b"",
        max_cached_tokens: int | None = None,
        probe: PrefixProbe | None = None,
        split: Callable[[int, int, int], int] | None = None,
        layerwise: bool = False,
    ) -> PrefixPlan:
        """Create a GPU sequence for `tokens`, reusing GPU then host blocks by hash.

        `probe` (from `probe_prefix` on the same tokens and tenant) saves hashing again.
        `split(gpu_cached_tokens, host_blocks, tokens_after)` plans a load-and-compute
        split of the host run (`CostModel.split_restore`): how many of its blocks to copy;
        the rest is computed with the new tokens. `layerwise` asks the engine for a copy
        signalled layer by layer (`TransferHandle.wait_layer`, where it
        `supports_layers`), so a prefill can start before the copy ends.

        Raises:
            ValueError: `seq_id` already exists in either tier.
            OutOfBlocksError: not enough GPU blocks; nothing changed.
        """
        self._check_new(seq_id)
        self.gpu.add_sequence(seq_id, tenant=tenant, extra_keys=extra_keys)
        try:
            r = self.gpu.append_tokens(
                seq_id,
                tokens,
                max_cached_tokens=max_cached_tokens,
                known_hashes=None if probe is None else probe.hashes,
                known_contents=None if probe is None else probe.contents,
            )
        except BaseException:
            self.gpu.free_sequence(seq_id)
            raise
        table = self.gpu.table(seq_id)
        bs = self.block_size
        k1 = len(r.hit_block_ids)
        host_ids: list[int] = []
        if self.host is not None:
            limit = len(table.hashes)
            if max_cached_tokens is not None:
                limit = min(limit, max_cached_tokens // bs)
            match = self.host.pool.match
            for i in range(k1, limit):
                block_id = match(table.hashes[i], table.block_content(i))
                if block_id is None:
                    break
                host_ids.append(block_id)
            if host_ids:
                self.host.pool.acquire_matched(host_ids)
            start = k1 + len(host_ids)
            while self.remote is not None and start < limit:
                # the rest of the chain from the shared store, into the host tier, one
                # round trip per `max_fetch_blocks` until the run ends
                end = min(limit, start + self.remote.max_fetch_blocks)
                want = end - start
                got = self.remote.fetch_into_host(
                    self.host.pool,
                    table.hashes[start:end],
                    [table.block_content(i) for i in range(start, end)],
                )
                fetched: list[int] = []
                for i in range(start, start + got):
                    block_id = match(table.hashes[i], table.block_content(i))
                    if block_id is None:
                        break
                    fetched.append(block_id)
                self.host.pool.acquire_matched(fetched)
                host_ids += fetched
                start += len(fetched)
                if len(fetched) < want:
                    break
        if split is not None and host_ids:
            # a load-and-compute split: copy the first `keep` blocks, compute the rest
            rest = table.num_tokens - (k1 + len(host_ids)) * bs
            keep = min(len(host_ids), max(0, split(k1 * bs, len(host_ids), rest)))
            assert self.host is not None
            if keep < len(host_ids):
                self.host.pool.release(host_ids[keep:][::-1])
                host_ids = host_ids[:keep]
        if host_ids:
            assert self.host is not None
            positions = list(range(k1, k1 + len(host_ids)))
            pending = _Pending(
                seq_id,
                TransferHandle("restore", [], []),
                positions,
                valid_end=(k1 + len(host_ids)) * bs,
                held_host=host_ids,
            )
            self._submit(
                pending, host_ids, [table.block_ids[i] for i in positions], layered=layerwise
            )
        num_host = len(host_ids) * bs
        return PrefixPlan(
            num_gpu_cached_tokens=k1 * bs,
            num_host_cached_tokens=num_host,
            compute_start=r.compute_start + num_host,
            slot_mapping=r.slot_mapping[num_host:],
            pending=bool(host_ids),
        )

    def offload(self, seq_id: SeqId) -> TransferHandle:
        """Start copying a GPU sequence to the host tier.

        Its GPU blocks stay referenced until the copy completes (see `poll`).

        Raises:
            ValueError: no host tier; the sequence is not on the GPU, has a copy in
                flight, or has tokens not yet computed.
            OutOfBlocksError: the host tier lacks room; nothing changed.
        """
        host, _engine = self._need_host()
        self._check_idle_on_gpu(seq_id, "offload")
        g = self.gpu.table(seq_id)
        if g.num_computed_tokens != g.num_tokens:
            raise ValueError(
                f"offload {seq_id!r}: {g.num_tokens - g.num_computed_tokens} tokens are not "
                "computed yet; offload between steps"
            )
        host.add_sequence(seq_id, tenant=g.tenant, root=g.root)
        try:
            r = host.append_tokens(seq_id, g.tokens, known_hashes=g.hashes)
        except OutOfBlocksError as exc:
            host.free_sequence(seq_id)
            raise _host_full("offload", seq_id, exc) from exc
        except BaseException:
            host.free_sequence(seq_id)
            raise
        k = len(r.hit_block_ids)  # already on the host: shared, not copied again
        h = host.table(seq_id)
        positions = list(range(k, len(h.block_ids)))
        pending = _Pending(
            seq_id, TransferHandle("offload", [], []), positions, valid_end=h.num_tokens
        )
        return self._submit(
            pending, [g.block_ids[i] for i in positions], [h.block_ids[i] for i in positions]
        )

    def backup(self, seq_id: SeqId) -> TransferHandle | None:
        """Start copying a GPU sequence's computed full blocks that the host tier lacks
        to the host, leaving the sequence on the GPU and usable (write-back ahead of
        need). Once the copy completes the blocks are findable on the host as cached,
        reclaimable blocks (a backup never holds host memory against other work), so a
        later `offload` of the sequence copies only what changed since, and a sequence
        whose GPU blocks were reclaimed is restored from the host instead of recomputed.

        The copy is tracked as `Backup(seq_id)` (`is_pending`, `wait`, `cancel`, and the
        `TransferResult` from `poll`); it holds references on its GPU source blocks
        (`backup_sources`), so the sequence may grow or be freed meanwhile. An `offload`
        of it started meanwhile cannot share the blocks still in flight and copies them
        again: free the sequence instead (the backup completes on its own). Returns the
        handle, or None when the host already holds every such block.

        Raises:
            ValueError: no host tier, the sequence is not on the GPU (or has a copy in
                flight), or a backup of it is already in flight.
            OutOfBlocksError: the host tier lacks room; nothing changed.
        """
        host, _engine = self._need_host()
        self._check_idle_on_gpu(seq_id, "backup")
        key = Backup(seq_id)
        if key in self._pending:
            raise ValueError(f"backup {seq_id!r}: a backup of it is already in flight")
        g = self.gpu.table(seq_id)
        bs = self.block_size
        num_full = g.num_cacheable_blocks
        if num_full == 0:
            return None
        host.add_sequence(key, tenant=g.tenant, root=g.root)
        try:
            r = host.append_tokens(key, g.tokens[: num_full * bs], known_hashes=g.hashes[:num_full])
        except OutOfBlocksError as exc:
            host.free_sequence(key)
            raise _host_full("backup", seq_id, exc) from exc
        except BaseException:
            host.free_sequence(key)
            raise
        k = len(r.hit_block_ids)  # already on the host: nothing to copy
        if k == num_full:
            host.free_sequence(key)
            return None
        h = host.table(key)
        positions = list(range(k, num_full))
        src = [g.block_ids[i] for i in positions]
        self.gpu.pool.acquire(src)
        pending = _Pending(
            key,
            TransferHandle("offload", [], []),
            positions,
            valid_end=num_full * bs,
            held_gpu=src,
            is_backup=True,
        )
        return self._submit(pending, src, [h.block_ids[i] for i in positions])

    def backup_sources(self, seq_id: SeqId) -> list[int]:
        """The GPU blocks an in-flight `backup` of `seq_id` holds (released when it
        completes); empty when none is in flight."""
        p = self._pending.get(Backup(seq_id))
        return list(p.held_gpu) if p is not None and p.is_backup else []

    def restore(
        self,
        seq_id: SeqId,
        extra_tokens: TokenInput | None = None,
        *,
        max_restore_blocks: int | None = None,
        layerwise: bool = False,
    ) -> PrefixPlan:
        """Start bringing an offloaded sequence back into (new) GPU blocks.

        Blocks still cached on the GPU are reused without a copy. `extra_tokens` (the next
        turn's input) are appended at once, so their blocks are reserved now; at least
        their last token is left to compute (the plan's slot mapping covers those).
        `max_restore_blocks` copies at most that many blocks after the GPU hits and
        leaves the rest of the history to compute with the new tokens (a load-and-compute
        split, `CostModel.split_restore`; 0: recompute everything not on the GPU).
        `layerwise`: a copy signalled layer by layer, as in `begin_sequence`.

        Raises:
            ValueError: the sequence is not offloaded (or has a copy in flight).
            OutOfBlocksError: not enough GPU blocks; nothing changed.
        """
        host, _engine = self._need_host()
        if self.location(seq_id) != "host":
            raise ValueError(
                f"restore {seq_id!r}: expected an offloaded sequence, it is at "
                f"{self.location(seq_id)!r}"
            )
        h = host.table(seq_id)
        extra = as_token_array(extra_tokens if extra_tokens is not None else [])
        if max_restore_blocks is not None and (
            isinstance(max_restore_blocks, bool)
            or not isinstance(max_restore_blocks, int)
            or max_restore_blocks < 0
        ):
            raise ValueError(
                f"restore {seq_id!r}: max_restore_blocks must be an int >= 0 or None, "
                f"got {max_restore_blocks!r}"
            )
        bs = self.block_size
        # check first: GPU hits on the history, then blocks for history + extra
        contents = self.gpu.hasher.chain_contents(h.root, h.tokens, h.hashes)
        hits = self.gpu.pool.match_chain(h.hashes, contents, len(h.hashes))
        need = -(-(h.num_tokens + len(extra)) // bs) - len(hits)
        available = self.gpu.pool.num_available - self.gpu.pool.count_cached(hits)
        if need > available:
            raise OutOfBlocksError(
                f"restore {seq_id!r}: needs {need} new GPU blocks, {available} available",
                needed=need,
                available=available,
            )
        self.gpu.add_sequence(seq_id, tenant=h.tenant, root=h.root)
        r = self.gpu.append_tokens(seq_id, h.tokens, known_hashes=h.hashes)
        if len(extra):  # leave at least one token to compute (the next-token logits)
            self.gpu.append_tokens(seq_id, extra, max_cached_tokens=len(extra) - 1)
        k = len(r.hit_block_ids)
        g = self.gpu.table(seq_id)
        positions = list(range(k, len(h.block_ids)))
        valid_end = h.num_tokens
        if max_restore_blocks is not None and max_restore_blocks < len(positions):
            positions = positions[:max_restore_blocks]
            valid_end = (k + len(positions)) * bs  # the rest is computed with the new tokens
        self._submit(
            _Pending(seq_id, TransferHandle("restore", [], []), positions, valid_end=valid_end),
            [h.block_ids[i] for i in positions],
            [g.block_ids[i] for i in positions],
            layered=layerwise,
        )
        pending = seq_id in self._pending
        start = valid_end if pending else g.num_computed_tokens
        return PrefixPlan(
            num_gpu_cached_tokens=k * bs,
            num_host_cached_tokens=start - k * bs,
            compute_start=start,
            slot_mapping=self.gpu.slot_mapping(seq_id, start, g.num_tokens),
            pending=pending,
        )

    def restores_in_flight(self) -> int:
        """Restore copies in flight."""
        return sum(1 for p in self._pending.values() if p.handle.direction == "restore")

    def drop_offloaded(self, seq_id: SeqId) -> None:
        """Release an offloaded sequence's host blocks (its full blocks stay findable
        in the host cache until reclaimed).

        Raises:
            ValueError: the sequence is not offloaded.
        """
        host, _engine = self._need_host()
        if self.location(seq_id) != "host":
            raise ValueError(
                f"drop_offloaded {seq_id!r}: expected an offloaded sequence, it is at "
                f"{self.location(seq_id)!r}"
            )
        host.free_sequence(seq_id)

    def free(self, seq_id: SeqId) -> None:
        """Release a sequence wherever it is. With a copy in flight, the release happens
        when the copy completes (its blocks cannot be reused before).

        Raises:
            KeyError: this cache does not hold the sequence.
        """
        pending = self._pending.get(seq_id)
        if pending is not None:
            pending.free_after = True
            return
        if seq_id in self.gpu:
            self.gpu.free_sequence(seq_id)
        elif self.host is not None and seq_id in self.host:
            self.host.free_sequence(seq_id)
        else:
            raise KeyError(f"unknown sequence id {seq_id!r}")

    def cancel(self, seq_id: SeqId) -> None:
        """Treat a sequence's in-flight copy as failed once the hardware is done with it.

        Raises:
            ValueError: no copy is in flight for it.
        """
        if seq_id not in self._pending:
            raise ValueError(f"cancel {seq_id!r}: no transfer in flight")
        self._pending[seq_id].cancelled = True

    # ------------------------------------------------------------------ completion
    def _submit(
        self, p: _Pending, src_ids: list[int], dst_ids: list[int], *, layered: bool = False
    ) -> TransferHandle:
        """Start a sequence's copy. With nothing to copy it completes here and now, so the
        sequence is never shown in flight. If the engine raises, everything the caller
        reserved for the copy is released and the exception propagates. `layered` is
        passed on only to an engine that `supports_layers` (others copy as a whole)."""
        self._pending[p.seq_id] = p
        if not src_ids:
            self._complete(p)
            return p.handle
        assert self.engine is not None
        try:
            if layered and getattr(self.engine, "supports_layers", False):
                p.handle = self.engine.submit(p.handle.direction, src_ids, dst_ids, layered=True)
            else:
                p.handle = self.engine.submit(p.handle.direction, src_ids, dst_ids)
        except BaseException:
            del self._pending[p.seq_id]
            assert self.host is not None
            if p.held_host:
                self.host.pool.release(p.held_host[::-1])
            if p.held_gpu:
                self.gpu.pool.release(p.held_gpu[::-1])
            if p.handle.direction == "offload":
                self.host.free_sequence(p.seq_id)
            else:
                self.gpu.free_sequence(p.seq_id)
            raise
        if not p.is_backup:  # a backup holds its own source refs: the table may change
            self.gpu.freeze(p.seq_id, f"{p.handle.direction} copy")
        return p.handle

    def poll(self) -> list[TransferResult]:
        """Commit every finished copy (never blocks). Returns their results.

        A handle whose completion check raises (an asynchronous device error surfacing)
        is committed as failed, with the error on its handle; the others are unaffected.
        """
        done = [p for p in list(self._pending.values()) if self._finished(p, block=False)]
        return [self._complete(p) for p in done]

    def wait(self, seq_id: SeqId) -> TransferResult | None:
        """Block until a sequence's copy finishes and commit it (None if none in flight)."""
        pending = self._pending.get(seq_id)
        if pending is None:
            return None
        self._finished(pending, block=True)
        return self._complete(pending)

    def wait_all(self) -> list[TransferResult]:
        """Block until every copy finishes; commit them in submission order."""
        out = []
        for pending in list(self._pending.values()):
            self._finished(pending, block=True)
            out.append(self._complete(pending))
        return out

    @staticmethod
    def _finished(p: _Pending, *, block: bool) -> bool:
        """Whether `p`'s copy is over (waiting for it when `block`). An error raised by
        the check fails the whole copy: nothing it moved is trusted."""
        try:
            if block:
                p.handle.wait()
                return True
            return p.handle.done()
        except Exception as exc:  # e.g. a CUDA error reported by the completion event
            p.handle.error = exc
            p.cancelled = True
            return True

    def _complete(self, p: _Pending) -> TransferResult:
        del self._pending[p.seq_id]
        self.gpu.thaw(p.seq_id)
        failed_pairs = set(range(len(p.positions))) if p.cancelled else p.handle.failed
        failed = sorted(p.positions[i] for i in failed_pairs)
        if failed:
            # only the prefix before the first failed block is kept; the blocks after it
            # moved but are discarded (a table is valid up to its first gap)
            failed = [pos for pos in p.positions if pos >= failed[0]]
        bs = self.block_size
        assert self.host is not None
        if p.held_gpu:
            self.gpu.pool.release(p.held_gpu[::-1])
        if p.is_backup:
            h = self.host.table(p.seq_id)
            # the good prefix becomes findable on the host; the backup table holds nothing
            self.host.mark_computed(p.seq_id, min(failed[0] * bs, h.num_tokens) if failed else None)
            self.host.free_sequence(p.seq_id)
            valid = h.num_tokens if not failed else failed[0] * bs
        elif p.handle.direction == "offload":
            h = self.host.table(p.seq_id)
            if not failed:
                self.host.mark_computed(p.seq_id)
                self.gpu.free_sequence(p.seq_id)
                valid = h.num_tokens
            else:
                # keep the good prefix findable on the host; the GPU copy is untouched
                self.host.mark_computed(p.seq_id, min(failed[0] * bs, h.num_tokens))
                self.host.free_sequence(p.seq_id)
                valid = 0
        else:
            valid = p.valid_end if not failed else failed[0] * bs
            if p.held_host:
                self.host.pool.release(p.held_host[::-1])
            # extra tokens appended after a history with no copy can be cache hits too
            valid = max(valid, self.gpu.table(p.seq_id).num_computed_tokens)
            self.gpu.mark_computed(p.seq_id, valid)
            if p.seq_id in self.host:  # restore of an offloaded sequence
                self.host.free_sequence(p.seq_id)
        if self.remote is not None and p.handle.direction == "offload" and p.handle.dst_ids:
            self._write_behind(p, failed)
        result = TransferResult(
            seq_id=p.seq_id,
            direction=p.handle.direction,
            ok=not failed,
            num_blocks_copied=len(p.positions) - len(failed),
            failed_blocks=failed,
            valid_tokens=valid,
            backup=p.is_backup,
        )
        if p.free_after:
            self.free(p.seq_id)
        return result

    def _write_behind(self, p: _Pending, failed: list[int]) -> None:
        """Queue the full blocks an offload or backup just put on the host for the
        remote tier (their bytes are snapshot now, while they are certainly valid)."""
        assert self.remote is not None and self.host is not None
        good = len(p.positions) if not failed else p.positions.index(failed[0])
        ids: list[int] = []
        hashes: list[bytes] = []
        contents: list[bytes] = []
        for j in range(good):
            key = self.host.pool.key_of(p.handle.dst_ids[j])
            if key is None:  # a partial last block, or not indexed: not shareable
                continue
            content = self.host.pool.content_of(p.handle.dst_ids[j])
            ids.append(p.handle.dst_ids[j])
            assert isinstance(key, bytes)
            hashes.append(key)
            contents.append(content)
        if ids:
            self.remote.write_behind(ids, hashes, contents)

    # ------------------------------------------------------------------ checks
    def check_invariants(self, *, deep: bool = True) -> None:
        """Both tiers' invariants, with in-flight references counted as holders.

        Raises:
            InvariantError: with the numbers that disagree.
        """
        held_gpu: dict[int, int] = {}
        held: dict[int, int] = {}
        for p in self._pending.values():
            for block_id in p.held_gpu:
                held_gpu[block_id] = held_gpu.get(block_id, 0) + 1
            for block_id in p.held_host:
                held[block_id] = held.get(block_id, 0) + 1
        self.gpu.check_invariants(deep=deep, extra_holders=held_gpu)
        if self.host is None:
            return
        self.host.check_invariants(deep=deep, extra_holders=held)
        both = set(self.gpu.sequences()) & set(self.host.sequences())
        stray = both - set(self._pending)
        if stray:
            raise InvariantError(f"sequences in both tiers with no copy in flight: {stray}")

    # ------------------------------------------------------------------ helpers
    def _need_host(self) -> tuple[BlockManager, TransferEngine]:
        if self.host is None or self.engine is None:
            raise ValueError("this TieredKVCache has no host tier")
        return self.host, self.engine

    def _check_new(self, seq_id: SeqId) -> None:
        if self.location(seq_id) is not None:
            raise ValueError(f"sequence id {seq_id!r} already exists ({self.location(seq_id)})")

    def _check_idle_on_gpu(self, seq_id: SeqId, what: str) -> None:
        loc = self.location(seq_id)
        if loc != "gpu":
            raise ValueError(f"{what} {seq_id!r}: expected a sequence on the GPU, it is at {loc!r}")


def _host_full(what: str, seq_id: SeqId, exc: OutOfBlocksError) -> OutOfBlocksError:
    """`exc` (from the host manager) restated as the host tier being full."""
    return OutOfBlocksError(
        f"{what} {seq_id!r}: the host tier is full: {exc}",
        needed=exc.needed,
        available=exc.available,
    )


__all__ = ["TieredKVCache"]
