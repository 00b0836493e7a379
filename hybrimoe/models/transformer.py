"""`MoETransformer`: one decoder-only transformer for every supported family (batch 1).

Module and parameter names mirror the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj.weight`,
`model.layers.N.mlp.gate.weight`, ...), so the loader maps a tensor name straight to a parameter;
routed experts are not parameters but rows of the `ExpertStore`.
Shapes: T = new tokens, H = hidden, V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrimoe.config import ModelConfig
from hybrimoe.errors import HybrimoeError
from hybrimoe.models.attention import Attention
from hybrimoe.models.kv_cache import KVCache, LayerKV
from hybrimoe.models.layers import GatedMLP, RMSNorm
from hybrimoe.moe.layer import Executor, MoEBlock, MoEHooks, ReferenceExecutor, RoutingObserver
from hybrimoe.moe.store import ExpertStore


def make_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.attention == "mla":
        from hybrimoe.models.mla import MLAttention  # DeepSeek multi-head latent attention
        return MLAttention(config, layer_idx)
    return Attention(config, layer_idx)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, executor: Executor, hooks: MoEHooks) -> None:
        super().__init__()
        self.self_attn = make_attention(config, layer_idx)
        if layer_idx in config.moe_layers:
            self.mlp: nn.Module = MoEBlock(config, layer_idx, executor, hooks)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_layer: LayerKV) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm: the `model.` prefix of checkpoint names."""

    def __init__(self, config: ModelConfig, executor: Executor, hooks: MoEHooks) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, executor, hooks) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoETransformer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 store: ExpertStore | None = None) -> None:
        super().__init__()
        self.config = config
        self.expert_store = store if store is not None else ExpertStore(config, dtype)
        self._hooks = MoEHooks()
        self.model = Backbone(config, ReferenceExecutor(self.expert_store), self._hooks)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.moe_blocks: dict[int, MoEBlock] = {
            i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoEBlock)}

    @property
    def routing_observer(self) -> RoutingObserver | None:
        return self._hooks.observer

    @routing_observer.setter
    def routing_observer(self, observer: RoutingObserver | None) -> None:
        self._hooks.observer = observer

    def set_executor(self, executor: Executor) -> None:
        """Routes every MoE layer's experts through `executor` (the hybrid runtime plugs in here)."""
        for block in self.moe_blocks.values():
            block.executor = executor

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_kv_cache(self, max_tokens: int) -> KVCache:
        return KVCache(self.config.num_layers, max_tokens)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int, kv: KVCache) -> torch.Tensor:
        """input_ids [T] at positions start_pos..start_pos+T-1 -> logits [T, V] fp32.

        `start_pos` = tokens already in `kv` (a smaller value rewinds the cache to that prefix).
        """
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise HybrimoeError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(input_ids.shape)}")
        if not 0 <= start_pos <= kv.length:
            raise HybrimoeError(f"start_pos {start_pos} is beyond the {kv.length} tokens in the KV cache")
        t = input_ids.shape[0]
        kv.length = start_pos
        positions = torch.arange(start_pos, start_pos + t, device=input_ids.device)   # [T]
        x = self.model.embed_tokens(input_ids)                                       # [T, H]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, kv[i])
        kv.length = start_pos + t
        return self.lm_head(self.model.norm(x)).float()                              # [T, V]
