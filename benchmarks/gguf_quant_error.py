"""How far quantised GGUF files move the logits of the tiny checkpoints (numbers for docs/GGUF.md).

For each family and type: the tiny checkpoint (seed 0) is converted with the test-side writer
(tests/gguf_writer.py, llama.cpp's conventions), loaded by hybrimoe, and run on a 16-token prompt.
One JSON row each:
  rel_err_all        max|logits - original| / max|original| over all 16 positions
  rel_err_same_route the same over the positions before the first token whose top-k experts changed
  first_route_change position of that token (16 = none)
  vs_fp32_stored     max|logits - transformers run on the stored (dequantised) values|
  greedy_equal       common prefix of 16 greedy tokens with the original
Usage: .venv/bin/python benchmarks/gguf_quant_error.py [--families mixtral,...] > rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gguf_fixtures import REAL_CONFIG, WIDE, TinyGGUF  # noqa: E402
from gguf_writer import write_gguf  # noqa: E402
from hybrimoe.loader import load_model  # noqa: E402
from hybrimoe.tiny import FAMILIES, make_tiny  # noqa: E402
from test_gguf_parity import routed_logits, stored_values_checkpoint  # noqa: E402
from test_parity import cached_greedy, prompt_ids  # noqa: E402


def row(family: str, qtype: str, hidden: int, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    hf = work / f"hf-{family}-{hidden}"
    if not hf.exists():
        make_tiny(family, hf, hidden=hidden, overrides=dict(REAL_CONFIG.get(family, {}),
                                                            **(WIDE if hidden >= 256 else {})))
    files, expected = write_gguf(hf, work / f"{family}-{hidden}-{qtype}.gguf", qtype)
    ours, original = load_model(files[0], progress=False), load_model(hf, progress=False)
    ids = prompt_ids(ours.config.vocab_size)
    got, mine = routed_logits(ours, ids)
    want, theirs = routed_logits(original, ids)
    changed = torch.zeros(len(ids), dtype=torch.bool)
    for a, b in zip(mine, theirs):
        changed |= (a != b).any(-1)
    first = int(changed.nonzero()[0]) if changed.any() else len(ids)
    err = (got - want).abs().amax(-1) / want.abs().max()
    ref_dir = work / f"ref-{family}-{hidden}-{qtype}"
    ref_dir.mkdir()
    ref = AutoModelForCausalLM.from_pretrained(stored_values_checkpoint(TinyGGUF(hf, files, expected), ref_dir),
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        stored = ref(ids[None]).logits[0]
    a, _ = cached_greedy(ours, ids, 16)
    b, _ = cached_greedy(original, ids, 16)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 16)
    return {"family": family, "qtype": qtype, "hidden": hidden, "rel_err_all": round(float(err.max()), 5),
            "rel_err_same_route": round(float(err[:first].max()), 5) if first else None,
            "first_route_change": first, "vs_fp32_stored": float((got - stored).abs().max()),
            "greedy_equal": same, "measured": "CPU, tiny random checkpoint (seed 0)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for qtype in ("F16", "Q8_0", "Q4_0"):
                print(json.dumps(row(family, qtype, 64, Path(tmp))), flush=True)
            if family in ("mixtral", "qwen3-moe", "deepseek-v2-lite"):
                print(json.dumps(row(family, "Q4_K", 256, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
