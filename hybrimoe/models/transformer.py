"""`MoETransformer`: one decoder-only transformer for every supported family.

Module and parameter names mirror the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj.weight`,
`model.layers.N.mlp.gate.weight`, ...), so the loader maps a tensor name straight to a parameter;
routed experts are not parameters but rows of the `ExpertStore`.

Several sequences run in one forward (`forward_batch`): their new tokens are concatenated into
N = sum T_i rows for embeddings, norms, projections, dense MLPs and the MoE layers (routed together:
the executor plans one layer over the whole batch), and attention runs per segment against that
segment's own KV cache at its own positions. `forward` is the one-segment case of the same code.
Shapes: T = new tokens of a segment, N = new tokens of all segments, S = segments, H = hidden,
V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_layers: list[LayerKV],
                lengths: list[int]) -> torch.Tensor:
        """x [N, H], positions [N]; segment i = the next lengths[i] rows, cached in kv_layers[i]."""
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_layers, lengths)
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
        self.ort_decoder: Any = None  # OrtDecoder (`--cpu-kernel onnxruntime`) or GgmlDecoder (`--cpu-kernel ggml`)

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

    @property
    def forward_prefill(self) -> bool | None:
        """Whether the forward now running is a prompt's (prefill) step, as its caller said; None outside a
        forward. The hybrid runtime plans by it (copy pipeline's prefill rule, scheduler choice)."""
        return self._hooks.prefill

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int, kv: KVCache) -> torch.Tensor:
        """input_ids [T] at positions start_pos..start_pos+T-1 -> logits [T, V] fp32.

        `start_pos` = tokens already in `kv` (a smaller value rewinds the cache to that prefix). A forward
        of more than one token counts as prefill (see `forward_prefill`).
        """
        x, done = self._hidden([(input_ids, start_pos, kv)], prefill=None)           # [T, H]
        return x if done else self.lm_head(self.model.norm(x)).float()               # [T, V]

    @torch.inference_mode()
    def forward_batch(self, segments: Sequence[tuple[torch.Tensor, int, KVCache]],
                      prefill: bool | None = None) -> torch.Tensor:
        """Segments (input_ids [T_i], start_pos_i, kv_i), each as in `forward`, in one pass -> logits [S, V]
        fp32 of each segment's last token. `prefill`: whether this step carries prompt tokens (the engine
        knows; None = any segment has more than one token). Every segment needs its own KV cache."""
        x, done = self._hidden(segments, prefill)                                    # [N, H]
        if done:
            return x                                                                 # [1, V]
        ends = torch.tensor(list(accumulate(int(ids.shape[0]) for ids, _, _ in segments)), device=x.device) - 1
        return self.lm_head(self.model.norm(x[ends])).float()                        # [S, V]

    def _hidden(self, segments: Sequence[tuple[torch.Tensor, int, KVCache]],
                prefill: bool | None) -> tuple[torch.Tensor, bool]:
        """Final hidden states [N, H] (before the norm) of all segments' tokens, in segment order, and False;
        or, where the decode graph also computes the final norm and lm_head (one CPU decode token,
        `ort_decoder.logits`), the logits [1, V] fp32 and True."""
        check_segments(segments)
        lengths = [int(ids.shape[0]) for ids, _, _ in segments]
        caches = [kv for _, _, kv in segments]
        input_ids = segments[0][0] if len(segments) == 1 else torch.cat([ids for ids, _, _ in segments])  # [N]
        positions = torch.cat([torch.arange(start, start + t, device=input_ids.device)
                               for (_, start, _), t in zip(segments, lengths)])             # [N]
        for (_, start, kv) in segments:
            kv.length = start
        self._hooks.prefill = max(lengths) > 1 if prefill is None else bool(prefill)
        try:
            if self.ort_decoder is not None and lengths == [1] and input_ids.device.type == "cpu":
                logits = self.ort_decoder.logits(self, input_ids, segments[0][1], caches[0])  # [1, V] or None
                done = logits is not None
                if logits is None:
                    x = self.ort_decoder.hidden(self, input_ids, segments[0][1], caches[0])  # [1, H]
                else:
                    x = logits
            else:
                done = False
                x = self.model.embed_tokens(input_ids)                               # [N, H]
                for i, layer in enumerate(self.model.layers):
                    x = layer(x, positions, [kv[i] for kv in caches], lengths)
        finally:
            self._hooks.prefill = None
        for (_, start, kv), t in zip(segments, lengths):
            kv.length = start + t
        return x, done


def check_segments(segments: Sequence[tuple[torch.Tensor, int, KVCache]]) -> None:
    """HybrimoeError naming the problem: no segment, an empty or non 1-D segment, a start position beyond
    what its cache holds, or two segments sharing one KV cache."""
    if not segments:
        raise HybrimoeError("forward_batch needs at least one segment")
    for i, (input_ids, start_pos, kv) in enumerate(segments):
        where = "" if len(segments) == 1 else f"segment {i}: "
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise HybrimoeError(f"{where}input_ids must be a non-empty 1-D tensor, got shape {tuple(input_ids.shape)}")
        if not 0 <= start_pos <= kv.length:
            raise HybrimoeError(f"{where}start_pos {start_pos} is beyond the {kv.length} tokens in the KV cache")
    if len({id(kv) for _, _, kv in segments}) != len(segments):
        raise HybrimoeError("two segments of one forward_batch share a KV cache: each sequence needs its own")
