"""Token content for simulated prompts: int32 tokens synthesised from block identities.

The prefix cache hashes real int32 token bytes, so the simulator gives each block
identity (a 63-bit key, see `pagedkv.sim.workload`) a fixed token pattern:

    pattern(key) = [lo32(key), hi32(key), lo32(key), hi32(key), ...]   # [tokens_per_block]

(`lo32` is the key's low 32 bits read as int32, `hi32` its high 31 bits.) The first
two tokens determine the key, so equal keys give equal blocks and different keys give
different blocks: content-consistent, as the workload format requires.

A partial last block of `r` tokens is the first `r` tokens of the pattern of the block
it *later becomes* in the same session (the key at that position in the session's next
request, found by looking ahead), not of its own partial key. That keeps a session's
token stream append-only: the sequence the server holds after turn k is a prefix of
turn k+1's prompt, so a pinned session appends exactly `prompt[k+1][len(prompt[k]):]`,
and a reconnect that re-sends the full history hashes to the same full blocks the pinned
session built. (A partial block is never hashed, so its own key carries no meaning.)

Keys live in one flat uint64 array with per-request offsets: no per-request Python
lists are kept, and synthesis is a few vectorised numpy calls per request.
"""

from __future__ import annotations

import numpy as np

from pagedkv.sim.workload import Workload

__all__ = ["PromptTokens"]


class PromptTokens:
    """Synthesises the int32 tokens of any request's prompt span.

    Invariants: for consecutive requests a, b of one session (b after a, same session id),
    `tokens(a, 0, a.input_len)` is a prefix of `tokens(b, 0, b.input_len)` whenever b's
    block keys start with a's full-block keys; equal full-block keys give equal tokens.
    """

    def __init__(self, workload: Workload) -> None:
        tpb = workload.tokens_per_block
        requests = workload.requests
        counts = np.fromiter((len(r.block_keys) for r in requests), np.int64, len(requests))
        offsets = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        keys = np.empty(int(offsets[-1]), dtype=np.uint64)
        for i, r in enumerate(requests):  # one C-level tuple -> array copy per request
            keys[offsets[i] : offsets[i + 1]] = r.block_keys
        # look ahead: a partial last block takes the content key of the same position in
        # the session's next request (itself resolved first, walking backwards)
        next_start: dict[str, int] = {}  # session -> index of its next request
        for i in range(len(requests) - 1, -1, -1):
            r = requests[i]
            sid = r.session_id
            if sid is None:
                continue
            j = len(r.block_keys) - 1
            nxt = next_start.get(sid)
            if r.input_len % tpb and nxt is not None and offsets[nxt] + j < offsets[nxt + 1]:
                keys[offsets[i] + j] = keys[offsets[nxt] + j]
            next_start[sid] = i
        self.tokens_per_block = tpb
        self._keys = keys
        self._offsets = offsets
        self._reps = -(-tpb // 2)

    def shares_prefix(self, a: int, b: int, num_tokens: int) -> bool:
        """Whether requests `a` and `b` have the same first `num_tokens` prompt tokens
        (the same content keys for every block that span touches). False when either
        prompt is shorter."""
        tpb = self.tokens_per_block
        n = -(-num_tokens // tpb)
        if n == 0:
            return True
        if a < 0 or b < 0:
            return False
        lo_a, lo_b = int(self._offsets[a]), int(self._offsets[b])
        if lo_a + n > self._offsets[a + 1] or lo_b + n > self._offsets[b + 1]:
            return False
        return bool(np.array_equal(self._keys[lo_a : lo_a + n], self._keys[lo_b : lo_b + n]))

    def tokens(self, index: int, start: int, end: int) -> np.ndarray:
        """Tokens of positions `[start, end)` of request `index`'s prompt: int32 `[end - start]`.

        Raises:
            ValueError: `start > end`, or the span reaches beyond the request's blocks.
        """
        tpb = self.tokens_per_block
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        if not 0 <= start <= end <= (hi - lo) * tpb:
            raise ValueError(
                f"request {index}: token span [{start}, {end}) outside its "
                f"{hi - lo} blocks of {tpb} tokens"
            )
        if start == end:
            return np.empty(0, dtype=np.int32)
        first = start // tpb
        last = -(-end // tpb)
        keys = self._keys[lo + first : lo + last].astype("<u8")
        pairs = keys.view("<i4").reshape(-1, 2)  # [n, 2]: low word, high word
        blocks = np.tile(pairs, (1, self._reps))[:, :tpb]  # [n, tpb]
        flat = blocks.reshape(-1)
        base = first * tpb
        out: np.ndarray = flat[start - base : end - base].astype(np.int32, copy=False)
        return out
