"""KV caches for decoding: one class serves both attention kinds.

Each layer caches two tensors per token, preallocated in steps:
- MLA: the normalised latent c_kv [B, 1, S, kv_lora_rank] and the shared k_rope [B, 1, S, rope]
  (kv_lora_rank + qk_rope_head_dim numbers per token per layer; keys/values are never expanded);
- MQA: the single shared key and value head [B, 1, S, head_dim] each.
Beams are batch rows: `reorder(rows)` picks and repeats rows after each beam-search step.
`StaticKVCache` holds the same tensors at a fixed capacity for the compiled decode step.
"""

from __future__ import annotations

import mlx.core as mx

from .config import ModelArgs


class KVCache:
    """Two growing tensors [B, 1, S, *] with a shared `offset` (tokens cached so far)."""

    step = 256

    def __init__(self) -> None:
        self.a: mx.array | None = None
        self.b: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        """Append a, b ([B, 1, L, *]) and return everything cached ([B, 1, offset, *])."""
        prev, L = self.offset, a.shape[2]
        if self.a is None or prev + L > self.a.shape[2]:
            n = ((prev + L + self.step - 1) // self.step) * self.step
            new_a = mx.zeros((a.shape[0], 1, n, a.shape[3]), a.dtype)
            new_b = mx.zeros((b.shape[0], 1, n, b.shape[3]), b.dtype)
            if self.a is not None:
                new_a[:, :, :prev] = self.a[:, :, :prev]
                new_b[:, :, :prev] = self.b[:, :, :prev]
            self.a, self.b = new_a, new_b
        self.a[:, :, prev : prev + L] = a
        self.b[:, :, prev : prev + L] = b
        self.offset = prev + L
        return self.a[:, :, : self.offset], self.b[:, :, : self.offset]

    def reorder(self, rows: mx.array) -> None:
        """Keep batch rows `rows` (beam search: parents of the surviving beams)."""
        if self.a is not None:
            self.a = self.a[rows]
            self.b = self.b[rows]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.a is None else [self.a, self.b]

    def numbers_per_token(self) -> int:
        """Numbers held per cached token per batch row (both tensors)."""
        return 0 if self.a is None else self.a.shape[3] + self.b.shape[3]

    def nbytes_per_token(self) -> int:
        return 0 if self.a is None else self.numbers_per_token() * self.a.dtype.size


def make_cache(args: ModelArgs) -> list[KVCache]:
    """One cache per transformer layer (MTP modules are not used when decoding)."""
    return [KVCache() for _ in range(args.num_hidden_layers)]


class StaticKVCache:
    """A fixed-capacity KVCache for a compiled decode step: same interface, array offset.

    `offset` is an mx.array scalar, so one traced graph serves every position;
    `update_and_fetch` writes with mx.slice_update and returns the whole buffer, so the caller
    must mask keys at positions > offset (see generate.decode_mask).
    """

    def __init__(self, a: mx.array, b: mx.array, offset: mx.array):
        self.a, self.b, self.offset = a, b, offset

    @classmethod
    def from_cache(cls, cache: KVCache, capacity: int) -> StaticKVCache:
        """Copy a filled KVCache into buffers of `capacity` tokens."""
        n = cache.offset
        pad = [(0, 0), (0, 0), (0, capacity - n), (0, 0)]
        a, b = (mx.pad(x[:, :, :n], pad) for x in (cache.a, cache.b))
        return cls(a, b, mx.array(n, mx.int32))

    def update_and_fetch(self, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        """Write a, b ([B, 1, L, *]) at offset; return the full buffers [B, 1, capacity, *]."""
        self.a = mx.slice_update(self.a, a, self.offset[None], axes=(2,))
        self.b = mx.slice_update(self.b, b, self.offset[None], axes=(2,))
        return self.a, self.b

    def reorder(self, rows: mx.array) -> None:
        self.a, self.b = self.a[rows], self.b[rows]

    @property
    def state(self) -> list[mx.array]:
        return [self.a, self.b]

    def numbers_per_token(self) -> int:
        return self.a.shape[3] + self.b.shape[3]

    def nbytes_per_token(self) -> int:
        return self.numbers_per_token() * self.a.dtype.size
