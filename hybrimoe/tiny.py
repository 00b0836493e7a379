"""Tiny random checkpoints of every supported family, made with the `transformers` model classes.

`make_tiny(family, out_dir)` trains a small byte-level BPE tokenizer on embedded text, builds the
family's `*ForCausalLM` with that vocabulary and random weights (std 0.15, so logits are not flat and
greedy tokens mean something), and saves both with `save_pretrained`. The configs switch on each
family's quirks: Qwen2-MoE shared expert and a dense layer, Qwen3-MoE head_dim != hidden/heads,
DeepSeek dense first layer, group-limited / noaux_tc routers, YaRN rope scaling like the real configs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hybrimoe.errors import ConfigError

log = logging.getLogger(__name__)

FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v2", "deepseek-v2-lite", "deepseek-v3")
LAYOUTS = ("per-expert", "fused")
INIT_STD = 0.15
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = """\
Mixture-of-experts language models route every token to a few experts out of many. Only the
selected experts run, so a model with many billions of parameters computes like a much smaller one.
The experts do not fit in the memory of one graphics card, so most of them live in host memory.
A hybrid engine runs some experts on the processor and copies others over the bus to the card.
The scheduler decides, for each layer, which experts run where, and the cache keeps the experts that
are used most often. Prefetching looks at the next layers and copies experts before they are needed.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Hello, world. What is the capital of France? The capital of France is Paris.
One, two, three, four, five, six, seven, eight, nine, ten. 0123456789 + - * / = ( ) [ ] { } < > .
user: please write a short poem about the sea. assistant: the sea is wide, the sea is deep.
"""


def train_tokenizer(vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=None,
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _yarn(max_pos: int, mscale: float) -> dict[str, Any]:
    """YaRN scaling shaped like DeepSeek's config.json (factor 4 over a 128-token original context)."""
    return {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": max_pos // 4,
            "mscale": mscale, "mscale_all_dim": mscale, "beta_fast": 32, "beta_slow": 1}


def tiny_config(family: str, vocab_size: int, eos: list[int], layers: int = 3, experts: int = 8,
                top_k: int = 2, hidden: int = 64, overrides: dict[str, Any] | None = None):
    """The transformers config object of a tiny `family` model."""
    import transformers as tf

    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    if hidden % 16:
        raise ConfigError(f"hidden size {hidden} must be a multiple of 16")
    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, num_experts_per_tok=top_k, max_position_embeddings=512,
                                  initializer_range=INIT_STD, eos_token_id=eos, bos_token_id=None,
                                  pad_token_id=eos[0], tie_word_embeddings=False)
    inter = hidden // 2
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=inter,
                               num_local_experts=experts, sliding_window=24)
    elif family == "qwen2-moe":
        cfg = tf.Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=2 * hidden,
                                moe_intermediate_size=inter, num_experts=experts, norm_topk_prob=False,
                                shared_expert_intermediate_size=hidden, mlp_only_layers=[1], qkv_bias=True)
    elif family == "qwen3-moe":
        cfg = tf.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=hidden // 4 + 8,
                                intermediate_size=2 * hidden, moe_intermediate_size=inter, num_experts=experts,
                                norm_topk_prob=True)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, num_key_value_heads=4, intermediate_size=inter, num_experts=experts,
                             norm_topk_prob=False, clip_qkv=8.0)
    else:
        v3 = family == "deepseek-v3"
        lite = family == "deepseek-v2-lite"
        mla = dict(kv_lora_rank=hidden // 4, q_lora_rank=None if lite else hidden // 2, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, intermediate_size=2 * hidden, moe_intermediate_size=inter,
                   n_routed_experts=experts, first_k_dense_replace=1)
        if v3:
            cfg = tf.DeepseekV3Config(**common, **mla, n_shared_experts=1, n_group=4, topk_group=2,
                                      norm_topk_prob=True, routed_scaling_factor=2.5,
                                      rope_scaling=_yarn(512, 1.0))
        else:
            router = (dict(topk_method="greedy", n_group=1, topk_group=1) if lite
                      else dict(topk_method="group_limited_greedy", n_group=4, topk_group=2))
            cfg = tf.DeepseekV2Config(**common, **mla, **router, n_shared_experts=2, norm_topk_prob=False,
                                      routed_scaling_factor=1.0 if lite else 2.0,
                                      rope_scaling=_yarn(512, 0.707))
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    return cfg


def make_tiny(family: str, out_dir: str | os.PathLike, layers: int = 3, experts: int = 8, top_k: int = 2,
              hidden: int = 64, layout: str = "per-expert", seed: int = 0, vocab_size: int = 384,
              max_shard_size: str | int | None = None, overrides: dict[str, Any] | None = None) -> str:
    """Writes a tiny random `family` checkpoint + tokenizer to `out_dir`; returns the directory."""
    import torch
    import transformers as tf

    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; supported: {', '.join(LAYOUTS)}")
    if not 0 < top_k <= experts:
        raise ConfigError(f"top-k {top_k} must be in 1..{experts}")
    if layers < 2:
        raise ConfigError(f"need at least 2 layers (DeepSeek and Qwen2 tiny models have a dense layer), "
                          f"got {layers}")
    out_dir = os.fspath(out_dir)
    tokenizer = train_tokenizer(vocab_size)
    vocab = len(tokenizer)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    config = tiny_config(family, vocab, eos, layers, experts, top_k, hidden, overrides)
    torch.manual_seed(seed)
    cls = tf.AutoModelForCausalLM.from_config
    model = cls(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # make the V3 bias matter for routing
                buf.copy_(torch.randn(buf.shape) * 0.1)
    kwargs: dict[str, Any] = {} if layout == "per-expert" else {"save_original_format": False}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    log.info("wrote tiny %s (%s layout, vocab %d) to %s", family, layout, vocab, out_dir)
    return out_dir
