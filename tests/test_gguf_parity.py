"""GGUF files give what the safetensors original gives.

- F32, every family: logits bit-identical to the safetensors load, greedy tokens identical to
  transformers' on the original (split files and a directory holding them too).
- F16 / BF16 / Q8_0 / Q4_0 / Q4_K: logits within 1e-4 of transformers run on the values the file
  stores (dequantised, written back as a safetensors checkpoint): the loader adds no error of its own,
  so the error against the original is the quantisation's own plus at most 1e-4; and, for tokens whose
  routing the quantisation did not change, within a first-order bound from the format's worst-case
  weight error (DELTA; docs/GGUF.md). A changed top-k choice moves logits by O(1): no weight-error
  bound covers it.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from gguf_fixtures import TinyGGUF, tiny_gguf  # noqa: F401  (fixture)
from gguf_quants import quantize_q4_k
from hybrimoe.loader import load_model
from hybrimoe.tiny import FAMILIES
from test_parity import cached_greedy, prompt_ids, reference_greedy

ATOL = 1e-4
# Worst-case error of one stored weight relative to the largest |weight| of its block (docs/GGUF.md):
# F16 2^-11 (round to nearest), BF16 2^-8, Q8_0 0.57/127 (half a step of amax/127, plus the fp16
# rounding of the scale over up to 127 steps), Q4_0 1.004/8 (a full step of amax/8 where +8 clips to
# +7, plus the fp16 scale), Q4_K 1/15 (a step of the sub-block range; 6-bit scales add more).
DELTA = {"F16": 2**-11, "BF16": 2**-8, "Q8_0": 0.57 / 127, "Q4_0": 1.004 / 8, "Q4_K": 1 / 15}
# First order, a token whose experts do not change passes through at most 7 weight matrices per layer
# in series (MLA: q_a, q_b, kv_a, kv_b, o; FFN: gate/up, down) and the lm_head: each adds at most
# DELTA relative error, so max|logits - original| <= (7 * layers + 1) * DELTA * max|original| at the
# positions before the first changed routing decision. Checked where that bound is below 0.5.
SERIES_PER_LAYER = 7


def routed_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [T, V] and the sorted experts [T, K] each MoE layer picked."""
    picked: list[torch.Tensor] = []
    model.routing_observer = lambda layer, rec: picked.append(rec.expert_ids.sort(-1).values)
    out = logits(model, ids)
    model.routing_observer = None
    return out, picked


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, 0, model.new_kv_cache(len(ids)))


def stored_values_checkpoint(t: TinyGGUF, out: Path) -> Path:
    """The original checkpoint directory with its weights replaced by the values the GGUF stores."""
    for f in t.hf_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in t.expected.items()}, out / "model.safetensors")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_the_safetensors_logits_and_greedy_tokens(tiny_gguf, family: str) -> None:
    t = tiny_gguf(family)
    original = load_model(t.hf_dir, progress=False)
    ours = load_model(t.path, progress=False)
    # every config field from the metadata (V3's multi-token-prediction layers are not converted)
    assert replace(ours.config, num_nextn_predict_layers=original.config.num_nextn_predict_layers) == original.config
    ids = prompt_ids(ours.config.vocab_size)
    assert torch.equal(logits(ours, ids), logits(original, ids))
    ref = AutoModelForCausalLM.from_pretrained(t.hf_dir, dtype=torch.float32).eval()
    tokens, _ = cached_greedy(ours, ids, 16)
    assert tokens == reference_greedy(ref, ids, 16)


@pytest.mark.parametrize("family", ["mixtral", "deepseek-v3"])
def test_split_files_and_a_directory_of_them_load_like_one_file(tiny_gguf, family: str) -> None:
    whole = tiny_gguf(family)
    split = tiny_gguf(family, split_max_tensors=7)
    assert len(split.files) > 2 and all(f.name.endswith(f"-of-{len(split.files):05d}.gguf") for f in split.files)
    ids = prompt_ids(300)
    want = logits(load_model(whole.path, progress=False), ids)
    for given in (split.files[0], split.files[-1], split.path.parent):
        assert torch.equal(logits(load_model(given, progress=False), ids), want)


def test_deepseek_file_with_whole_kv_b_loads_like_the_split_one(tiny_gguf) -> None:
    """Converters before llama.cpp's MLA split wrote attn_kv_b; newer ones attn_k_b (transposed) + attn_v_b."""
    split, whole = tiny_gguf("deepseek-v2"), tiny_gguf("deepseek-v2", split_kv_b=False)
    ids = prompt_ids(300)
    assert torch.equal(logits(load_model(whole.path, progress=False), ids),
                       logits(load_model(split.path, progress=False), ids))


def test_fused_gate_up_experts_load_like_separate_ones(tiny_gguf) -> None:
    """The converter's fuse_gate_up_exps option stores ffn_gate_up_exps [E, 2I, H] instead of two tensors."""
    separate, fused = tiny_gguf("deepseek-v2-lite"), tiny_gguf("deepseek-v2-lite", fuse_gate_up=True)
    assert "blk.1.ffn_gate_up_exps.weight" in {t.name for t in GGUFReader(fused.path).tensors}
    ids = prompt_ids(300)
    assert torch.equal(logits(load_model(fused.path, progress=False), ids),
                       logits(load_model(separate.path, progress=False), ids))


def check_quantised(t: TinyGGUF, qtype: str, tmp_path: Path) -> tuple[float, float]:
    """Asserts the module docstring's claims; returns the relative error against the original at every
    position and at the positions before the first changed routing decision."""
    ours = load_model(t.path, progress=False)
    ids = prompt_ids(ours.config.vocab_size)
    got, our_experts = routed_logits(ours, ids)
    ref = AutoModelForCausalLM.from_pretrained(stored_values_checkpoint(t, tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    # the bound: |ours - original| <= |same quantisation in transformers - original| + ATOL
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()
    original, their_experts = routed_logits(load_model(t.hf_dir, progress=False), ids)
    changed = torch.zeros(len(ids), dtype=torch.bool)
    for a, b in zip(our_experts, their_experts):
        changed |= (a != b).any(-1)
    first = int(changed.nonzero()[0]) if changed.any() else len(ids)   # later tokens attend to it
    err = (got - original).abs().amax(-1) / original.abs().max()          # [T]
    assert err.max() > 0
    bound = (SERIES_PER_LAYER * ours.config.num_layers + 1) * DELTA[qtype]
    if bound < 0.5 and first:
        assert err[:first].max() <= bound, (err[:first].max(), bound)
    return float(err.max()), float(err[:first].max()) if first else float("nan")


# Q8_0 for every family; F16 and Q4_0 on a subset that still covers every attention / router kind
QUANT_CASES = ([(f, "Q8_0") for f in FAMILIES] + [(f, "F16") for f in ("mixtral", "qwen2-moe", "deepseek-v3")]
               + [(f, "Q4_0") for f in ("qwen3-moe", "olmoe", "deepseek-v2")])


@pytest.mark.parametrize("family,qtype", QUANT_CASES)
def test_quantised_gguf_logits_within_the_formats_bound(tiny_gguf, tmp_path: Path, family: str, qtype: str) -> None:
    check_quantised(tiny_gguf(family, qtype), qtype, tmp_path)


def test_the_test_q4_k_quantiser_writes_what_gguf_reads_back() -> None:
    """Within ~half a step of each 32-weight sub-block's range (+ 6-bit scale rounding): the packing is right."""
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    y = dequantize(quantize_q4_k(x), GGMLQuantizationType.Q4_K)
    xs, ys = x.reshape(-1, 32), y.reshape(-1, 32)
    span = xs.max(1) - np.minimum(xs.min(1), 0)
    assert (np.abs(xs - ys).max(1) <= 0.04 * span).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "deepseek-v2-lite"])
def test_q4_k_gguf_with_256_wide_rows(tiny_gguf, tmp_path: Path, family: str) -> None:
    t = tiny_gguf(family, "Q4_K", hidden=256)
    types = {x.name: GGMLQuantizationType(x.tensor_type).name for x in GGUFReader(t.path).tensors}
    layer = 1 if family == "deepseek-v2-lite" else 0
    assert {types[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")} == {"Q4_K"}
    check_quantised(t, "Q4_K", tmp_path)


def test_bf16_q5_k_q6_k_and_fallback_types_load_to_their_stored_values(tiny_gguf, tmp_path: Path) -> None:
    """gguf-py cannot make Q5_K / Q6_K blocks: random valid ones stand in for two expert tensors; Q4_1,
    Q5_0, Q5_1 (llama-quantize's fallbacks for rows that are not a multiple of 256) by its quantisers."""
    t = tiny_gguf("qwen3-moe", "BF16", hidden=256,
                  force={"blk.0.ffn_down_exps.weight": "Q6_K", "blk.1.ffn_gate_exps.weight": "Q5_K",
                         "blk.1.ffn_up_exps.weight": "Q5_0", "blk.2.ffn_down_exps.weight": "Q4_1",
                         "blk.0.attn_v.weight": "Q5_1"})
    ours = load_model(t.path, progress=False)
    ids = prompt_ids(ours.config.vocab_size)
    ref = AutoModelForCausalLM.from_pretrained(stored_values_checkpoint(t, tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert torch.allclose(logits(ours, ids), want, atol=ATOL, rtol=0)
    down = t.expected["model.layers.0.mlp.experts.3.down_proj.weight"]
    assert torch.equal(ours.expert_store.weights(0, 3).down, down)
