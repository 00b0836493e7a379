"""Preallocated key/value cache, one `LayerKV` per decoder layer (batch 1).

Each attention module decides what it caches: GQA caches k [kv_heads, S, head_dim] and
v [kv_heads, S, head_dim] (in `kv_cache_dtype`: fp32 on the CPU for a bf16/fp16 model); MLA caches the normalised latent [1, S, kv_lora_rank] as "k" and the rotated
shared key [1, S, qk_rope_head_dim] as "v".
A layer's buffers are allocated on its first write, sized to `max_tokens`, with the shapes, dtype and
device of what was written; later writes copy into them, so decoding never reallocates.
"""

from __future__ import annotations

from typing import Any

import torch

from hybrimoe.errors import HybrimoeError


class LayerKV:
    """The cache of one layer: k [heads, max_tokens, dk], v [heads, max_tokens, dv]."""

    def __init__(self, cache: "KVCache") -> None:
        self.cache = cache
        self.max_tokens = cache.max_tokens
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k [heads, T, dk], v [heads, T, dv] at positions start..start+T-1, start = `cache.length`
        (the model sets it to `start_pos` before its layers run and advances it after them).

        Returns views of every cached position so far: k [heads, start+T, dk], v [heads, start+T, dv].
        """
        start_pos = self.cache.length
        end = start_pos + k.shape[1]
        cache_k, cache_v = self.buffers(end, k.shape[0], k.shape[2], v.shape[2], k.dtype, k.device)
        cache_k[:, start_pos:end] = k
        cache_v[:, start_pos:end] = v
        self.cache.written_from = min(self.cache.written_from, start_pos)
        return cache_k[:, :end], cache_v[:, :end]

    def buffers(self, end: int, heads: int, dk: int, dv: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers k [heads, max_tokens, dk], v [heads, max_tokens, dv] (allocated on first use),
        after checking that `end` tokens fit: HybrimoeError when they do not."""
        if end > self.max_tokens:
            raise HybrimoeError(f"KV cache full: {end} tokens do not fit in max_tokens={self.max_tokens}")
        if self.k is None or self.v is None:
            self.k = torch.empty(heads, self.max_tokens, dk, dtype=dtype, device=device)
            self.v = torch.empty(heads, self.max_tokens, dv, dtype=dtype, device=device)
        return self.k, self.v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class KVCache:
    """Per-layer caches plus the number of tokens they hold (`length`, advanced by the model).

    To forget tokens, call the model with a smaller `start_pos` (0 starts a new sequence): the buffers
    are kept and overwritten."""

    def __init__(self, num_layers: int, max_tokens: int) -> None:
        if max_tokens < 1:
            raise HybrimoeError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        self.layers = [LayerKV(self) for _ in range(num_layers)]
        self.length = 0
        self.written_from = 0  # lowest position `LayerKV.append` wrote since a copy of the cache last synced
        #                        (the ggml decode graphs' F16 copy, hybrimoe.models.ggml_kv)

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def gqa_cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype GQA attention caches keys/values in: fp32 for a bf16/fp16 model on the CPU (attention
    computes in fp32 there, and converting the whole cache on every decode token cost 2.6 against 0.47 ms
    per layer at 1024 cached tokens on a 2-vCPU AMD EPYC: 2x the cache's memory for 5x faster attention),
    the model's dtype otherwise."""
    if dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
        return torch.float32
    return dtype


def kv_cache_dtype(attention: str, dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a model of `dtype` on `device` caches in, by its attention kind (`config.attention`,
    `ModelShape.attention.kind`): `gqa_cache_dtype` for GQA, the model's for "mla"."""
    return dtype if attention == "mla" else gqa_cache_dtype(dtype, device)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token occupies in a `KVCache` over all layers: GQA 2 * kv_heads * head_dim values per
    layer (k and v), MLA kv_lora_rank + qk_rope_head_dim (latent and shared rotary key), in `dtype` (the
    cache's: `kv_cache_dtype`)."""
    if config.attention == "mla":
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_layer = 2 * config.num_kv_heads * config.head_dim
    return int(config.num_layers) * per_layer * torch.empty((), dtype=dtype).element_size()
