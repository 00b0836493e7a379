"""Small stand-ins for engine unit tests: a byte-level BPE tokenizer and a model that follows the
MoETransformer contract (forward(ids [T], start_pos, kv) -> logits [T, V], routing_observer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog.", "café naïve façade — 東京 ✓ 🙂",
          "STOP here and END there; the end.", "numbers 0123456789 and more words here"] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (multi-byte characters span several tokens), with <s> and </s>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class FakeConfig:
    vocab_size: int
    max_position_embeddings: int = 64
    eos_token_ids: tuple[int, ...] = ()
    num_layers: int = 3
    num_experts: int = 4
    top_k: int = 2
    moe_layers: tuple[int, ...] = (1, 2)


@dataclass
class FakeRecord:
    layer: int
    expert_ids: torch.Tensor  # [T, K]
    weights: torch.Tensor  # [T, K]
    scores: torch.Tensor  # [T, E]


@dataclass
class FakeKV:
    capacity: int
    length: int = 0


class FakeModel:
    """Logits depend on (position, input token); `script` forces the greedy continuation.

    With `script`, the token at completion index i is script[i] (by a margin of 20 nats).
    Routing: experts = top-k of a fixed score table indexed by input token id.
    """

    def __init__(self, config: FakeConfig, script: list[int] | None = None, prompt_len: int = 0) -> None:
        self.config, self.script, self.prompt_len = config, script, prompt_len
        self.calls: list[tuple[int, int]] = []  # (start_pos, T) of every forward
        g = torch.Generator().manual_seed(0)
        v, p = config.vocab_size, config.max_position_embeddings
        self.table = torch.randn(p, v, generator=g)  # [P, V]
        self.token_mix = torch.randn(v, v, generator=g) * 0.5  # [V, V]
        self.router = torch.randn(v, config.num_experts, generator=g)  # [V, E]
        self.routing_observer = None

    def __call__(self, input_ids: torch.Tensor, start_pos: int, kv: "FakeKV") -> torch.Tensor:
        return self.forward(input_ids, start_pos, kv)

    def new_kv_cache(self, max_tokens: int) -> FakeKV:
        assert max_tokens <= self.config.max_position_embeddings
        return FakeKV(max_tokens)

    def forward_batch(self, segments: list[tuple[torch.Tensor, int, "FakeKV"]],
                      prefill: bool | None = None) -> torch.Tensor:
        """The MoETransformer.forward_batch contract: last-token logits [S, V] of each (ids, start_pos, kv);
        the routing observer sees the rows of all segments together, once per MoE layer."""
        observer, self.routing_observer = self.routing_observer, None
        try:
            logits = torch.stack([self.forward(ids, start, kv)[-1] for ids, start, kv in segments])
        finally:
            self.routing_observer = observer
        self._observe(torch.cat([ids for ids, _, _ in segments]))
        return logits

    def forward(self, input_ids: torch.Tensor, start_pos: int, kv: FakeKV) -> torch.Tensor:
        assert input_ids.dim() == 1 and start_pos == kv.length, (input_ids.shape, start_pos, kv.length)
        t = input_ids.shape[0]
        assert kv.length + t <= kv.capacity, "KV cache overflow"
        kv.length += t
        self.calls.append((start_pos, t))
        pos = torch.arange(start_pos, start_pos + t)
        logits = self.table[pos] + self.token_mix[input_ids]  # [T, V]
        if self.script is not None:
            for row, p in enumerate(pos.tolist()):
                i = p + 1 - self.prompt_len  # completion index predicted at this position
                if 0 <= i < len(self.script):
                    logits[row, self.script[i]] += 20.0
        self._observe(input_ids)
        return logits

    def _observe(self, input_ids: torch.Tensor) -> None:
        if self.routing_observer is not None:
            scores = torch.softmax(self.router[input_ids], dim=-1)  # [T, E]
            weights, ids = torch.topk(scores, self.config.top_k, dim=-1)  # [T, K]
            for layer in self.config.moe_layers:
                self.routing_observer(layer, FakeRecord(layer, ids, weights, scores))
