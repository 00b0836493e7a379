"""One decoder-only transformer for every supported MoE family, with family hooks."""

from hybrimoe.models.kv_cache import KVCache, LayerKV
from hybrimoe.models.transformer import MoETransformer

__all__ = ["KVCache", "LayerKV", "MoETransformer"]
