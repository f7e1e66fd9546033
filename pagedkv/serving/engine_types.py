"""The engine's configuration, its requests, and the events it reports per request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.conversation import Item
from pagedkv.serving.generation import OutputSpec, TokenSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Sizes and policies of one engine.

    Attributes:
        block_size: token positions per KV block.
        num_gpu_blocks: blocks of the device pool (the "GPU" tier, CPU memory on a CPU).
        num_host_blocks: blocks of the host tier (0: no host tier; evicted sessions are
            dropped to the hash cache instead of offloaded).
        max_batch_tokens: new tokens per forward step. Decode tokens always run; prefill
            chunks fill what is left, oldest request first.
        prefill_chunk_tokens: new tokens of one sequence per step (chunked prefill).
        scheduler: admission, pinning and eviction (`reuse_prefix=False` switches the
            content-hash cache off: a pure stateless server for HTTP).
            `layerwise_restore=True` starts a restored turn's prefill while its prefix
            is still being copied in, each layer waiting for its own copy (`pagedkv
            serve` and `PagedLM` turn it on for CUDA devices; on a CPU the copy and the
            prefill compete for the same cores).
        device: where the model and the device pool live.
        seed: seeds sampling.
        hash_secret: the block hasher's tenant-root secret (None: random per process).
        tenant: the tenant of every session (hash chains are salted per tenant).
        step_delay_s: a test hook: sleep this long in the engine thread before every
            forward step (simulates a slow model; the server must stay responsive).
        remote_url: a Redis/Valkey URL (`redis://host:port/db`) for the shared remote KV
            tier under the host tier (None: none). Replicas that share it need the same
            `hash_secret` and `remote_namespace`, and a host tier.
        remote_namespace: the key namespace on the remote store.
        remote_ttl_s: expiry of each block written to the remote store.
        remote_timeout_s: socket timeout of each remote call (a slow store is a miss).
        advertise_url: with `remote_url`, publish the block hashes this engine holds
            under this name (the URL the router knows the replica by) for KV-aware
            routing (`pagedkv.serving.kv_index`); None: publish nothing.
        publish_interval_s: seconds between two snapshots of the held hashes.
        publish_max_hashes: the most hashes published.
    """

    block_size: int = 16
    num_gpu_blocks: int = 1024
    num_host_blocks: int = 2048
    max_batch_tokens: int = 512
    prefill_chunk_tokens: int = 512
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    seed: int = 0
    hash_secret: bytes | None = None
    tenant: str = "default"
    step_delay_s: float = 0.0
    remote_url: str | None = None
    remote_namespace: str = "default"
    remote_ttl_s: float | None = 3600.0
    remote_timeout_s: float = 0.1
    advertise_url: str | None = None
    publish_interval_s: float = 1.0
    publish_max_hashes: int = 65536

    def __post_init__(self) -> None:
        if self.remote_url is not None:
            if not self.num_host_blocks:
                raise ValueError("EngineConfig.remote_url needs a host tier (num_host_blocks > 0)")
            if self.hash_secret is None:
                raise ValueError(
                    "EngineConfig.remote_url needs hash_secret: replicas find each other's "
                    "blocks only under the same secret"
                )
        if self.advertise_url is not None and self.remote_url is None:
            raise ValueError("EngineConfig.advertise_url needs remote_url (the index is "
                             "published in the remote store)")  # fmt: skip
        if not 0 < self.publish_interval_s < float("inf"):
            raise ValueError(f"EngineConfig.publish_interval_s must be > 0, got "
                             f"{self.publish_interval_s}")  # fmt: skip
        for name in ("block_size", "num_gpu_blocks", "max_batch_tokens", "prefill_chunk_tokens",
                     "publish_max_hashes"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.num_host_blocks, int) or self.num_host_blocks < 0:
            raise ValueError(
                f"EngineConfig.num_host_blocks must be an int >= 0, got {self.num_host_blocks!r}"
            )
        if self.step_delay_s < 0:
            raise ValueError(f"EngineConfig.step_delay_s must be >= 0, got {self.step_delay_s}")
        if not isinstance(self.scheduler, SchedulerConfig):
            raise TypeError(
                f"EngineConfig.scheduler must be a SchedulerConfig, got "
                f"{type(self.scheduler).__name__}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineRequest:
    """One turn for the engine.

    Attributes:
        request_id: names the turn in events and logs.
        session_id: the client session (a WebSocket connection), opened with
            `Engine.open_session`; or, with `ephemeral`, a fresh id for this turn only.
        prompt_tokens: the full rendered conversation (ending with the assistant header
            when generating). The engine works out what the session already holds.
        output: what to generate (`OutputSpec`: a chat item; `TokenSpec`: free tokens);
            None for a `generate: false` warm-up (prefill only).
        ephemeral: a stateless request: its session is opened for this turn and closed
            after it (its blocks stay in the hash cache if that is on).
        arrival: `time.monotonic()` when the request arrived (TTFT is measured from it).
        tenant: the tenant of an `ephemeral` request's session (default:
            `EngineConfig.tenant`); a non-ephemeral session keeps the tenant it was
            opened with.
        cache_key: a sub-salt within the tenant (the API's `prompt_cache_key`): the
            turn's hash chain, and so every block it can hit or leave in the cache, is
            keyed by (tenant, cache_key). A session whose next turn names another key
            starts over under that key.
    """

    request_id: str
    session_id: str
    prompt_tokens: tuple[int, ...]
    output: OutputSpec | TokenSpec | None
    ephemeral: bool = False
    arrival: float = 0.0
    tenant: str | None = None
    cache_key: str | None = None


class TurnStarted(NamedTuple):
    """The turn was admitted; `cached_tokens` of `prompt_tokens` need no prefill."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int


class OutputStarted(NamedTuple):
    """The first output token is decided (`ttft_s` after arrival)."""

    request_id: str
    ttft_s: float


class OutputDelta(NamedTuple):
    """Visible text of the output item (message text or function-call arguments)."""

    request_id: str
    text: str


class TurnDone(NamedTuple):
    """The turn finished: its output item (None for a warm-up), usage and timings."""

    request_id: str
    item: Item | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    metrics: dict[str, Any]
    incomplete_reason: str | None = None  # "max_output_tokens" (the limit cut it) or "steered"
    output_ids: tuple[int, ...] = ()  # the sampled token ids (a TokenSpec's whole output)


class TurnFailed(NamedTuple):
    """The turn failed; `code` "over_capacity" when admission refused it."""

    request_id: str
    code: str
    message: str
    status: int
    error_type: str


EngineEvent = TurnStarted | OutputStarted | OutputDelta | TurnDone | TurnFailed
EventSink = Callable[[EngineEvent], None]
