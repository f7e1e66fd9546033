"""KVSpec: the shape of one KV cache, and the byte sizes derived from it."""

from __future__ import annotations

from dataclasses import dataclass

# bytes per element for the dtypes a KV cache is stored in
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"KVSpec.{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"KVSpec.{name} must be > 0, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class KVSpec:
    """Shape of a model's KV cache as stored by pagedkv.

    One block holds K and V of `block_size` token positions for every layer, laid out as
    `[num_layers, 2, block_size, num_kv_heads, head_dim]` (see DESIGN.md).

    Raises:
        TypeError / ValueError: a field of the wrong type, a non-positive size, or an unknown
            dtype name.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _check_positive_int(name, getattr(self, name))
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"KVSpec.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}"
            )

    @property
    def dtype_bytes(self) -> int:
        """Bytes per stored element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token position across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block (all layers, K and V)."""
        return self.bytes_per_token * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: `(num_layers, 2, block_size, num_kv_heads, head_dim)`."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token positions."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def num_blocks_in(self, num_bytes: int) -> int:
        """Whole blocks that fit in a byte budget."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return num_bytes // self.bytes_per_block
