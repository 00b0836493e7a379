"""One decoder-only transformer for every supported MoE family, with family hooks."""

from typing import Any

from hybrimoe.models.kv_cache import KVCache, LayerKV

__all__ = ["KVCache", "LayerKV", "MoETransformer"]


def __getattr__(name: str) -> Any:
    # Lazy: hybrimoe.moe.layer imports hybrimoe.models.layers, and the transformer imports
    # hybrimoe.moe.layer; importing the transformer here eagerly would make that a cycle.
    if name == "MoETransformer":
        from hybrimoe.models.transformer import MoETransformer
        return MoETransformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
