"""Fixture `tiny_gguf`: tiny checkpoints of every family converted to GGUF, each made once per session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from gguf_writer import write_gguf
from hybrimoe.tiny import make_tiny

# Config values that real checkpoints have and the tiny ones lack (or that llama.cpp cannot convert):
# Mixtral-8x7B has no sliding window (llama-arch GGUF files have no key for one); llama.cpp's qwen2moe
# has no dense-FFN layers (its TensorNameMap cannot even map them); OLMoE-1B-7B has clip_qkv null (the
# converter does not write it); DeepSeek configs give kv heads = heads (the kv_b split needs it) and
# their scoring_func / topk_method (which become expert_gating_func).
REAL_CONFIG = {
    "mixtral": {"sliding_window": None},
    "qwen2-moe": {"mlp_only_layers": []},
    "olmoe": {"clip_qkv": None},
    "deepseek-v2": {"num_key_value_heads": 4, "scoring_func": "softmax"},
    "deepseek-v2-lite": {"num_key_value_heads": 4, "scoring_func": "softmax"},
    "deepseek-v3": {"num_key_value_heads": 4, "scoring_func": "sigmoid", "topk_method": "noaux_tc"},
}
# K-quant rows are 256 long: hidden 256, every expert / dense intermediate size 256
WIDE = {"intermediate_size": 256, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256}


@dataclass
class TinyGGUF:
    hf_dir: Path                      # the safetensors original
    files: list[Path]                 # the GGUF file(s)
    expected: dict[str, torch.Tensor]  # original tensor name -> the values the file stores (dequantised)

    @property
    def path(self) -> Path:
        return self.files[0]


_made: dict[str, TinyGGUF] = {}
_hf: dict[tuple[str, int], Path] = {}


@pytest.fixture
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyGGUF]:
    """`tiny_gguf(family, qtype="F32", hidden=64, **write_options)` -> TinyGGUF (treat as read-only).

    hidden=256 also widens every FFN to 256 (K-quants); write_options go to `write_gguf`."""

    def make(family: str, qtype: str = "F32", hidden: int = 64, **write: Any) -> TinyGGUF:
        key = json.dumps([family, qtype, hidden, write], sort_keys=True, default=str)
        if key not in _made:
            if (family, hidden) not in _hf:
                overrides = dict(REAL_CONFIG.get(family, {}), **(WIDE if hidden >= 256 else {}))
                _hf[family, hidden] = tmp_path_factory.mktemp(f"hf-{family}-{hidden}")
                make_tiny(family, _hf[family, hidden], hidden=hidden, overrides=overrides)
            out = tmp_path_factory.mktemp(f"gguf-{family}-{qtype}") / f"tiny-{family}.gguf"
            files, expected = write_gguf(_hf[family, hidden], out, qtype, **write)
            _made[key] = TinyGGUF(_hf[family, hidden], files, expected)
        return _made[key]

    return make
