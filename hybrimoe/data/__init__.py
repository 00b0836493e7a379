"""Data shipped with the package: compact copies of the public routing traces (see traces/NOTICE).

`packaged_traces(model, role)` lists them; `rebuild_packaged_traces(src, dst)` regenerates them from
the original files (../shared/traces) with the importers, and writes traces/manifest.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.errors import TraceError

TRACES_DIR = Path(__file__).parent / "traces"
MANIFEST = TRACES_DIR / "manifest.json"
ROLES = ("dev", "eval")
WEIGHT_DECIMALS = 4  # combine weights in the packaged copies are rounded to this many decimals

# Original file (relative to the shared traces folder) -> (role, provenance), as the shared README states.
_SPEC_MOE = "Mario928/speculative-moe"
_OCS = "jinlong-huo/moe_ocs_learning"
ORIGINALS: dict[str, tuple[str, str]] = {
    "mixtral-8x7b/gsm8k.jsonl": ("dev", f"{_SPEC_MOE} (history blob of routing_data_collected/gsm8k_2_routing.jsonl)"),
    "mixtral-8x7b/humaneval.jsonl": ("eval", f"{_SPEC_MOE} routing_data_collected/humaneval_2_routing.jsonl"),
    "mixtral-8x7b/humaneval_alt.jsonl": ("eval", f"{_SPEC_MOE} analysis/deep_analysis/routing_raw.jsonl"),
    "qwen1.5-moe-a2.7b/cooking_1.json": ("dev", f"{_OCS} @ 1a70f161 (MIT)"),
    "qwen1.5-moe-a2.7b/history_1.json": ("dev", f"{_OCS} @ 1a70f161 (MIT)"),
    "qwen1.5-moe-a2.7b/ml_moe_1.json": ("dev", f"{_OCS} @ 1a70f161 (MIT)"),
    "qwen1.5-moe-a2.7b/history_2.json": ("eval", f"{_OCS} @ 1a70f161 (MIT)"),
    "qwen1.5-moe-a2.7b/ml_moe_2.json": ("eval", f"{_OCS} @ 1a70f161 (MIT)"),
    "qwen1.5-moe-a2.7b/ml_moe_3.json": ("eval", f"{_OCS} @ 1a70f161 (MIT)"),
    "qwen3.6-35b-a3b/chat_mlx.json": ("dev", f"{_OCS} @ 83eeb5f9 (MIT)"),
    "qwen3.6-35b-a3b/chat_vllm.json": ("eval", f"{_OCS} @ e91162b8 (MIT)"),
}


@dataclass(frozen=True)
class PackagedTrace:
    path: Path  # project-format trace, .jsonl.gz
    model: str  # named model shape, e.g. "mixtral-8x7b"
    role: str  # "dev" (tune on it) | "eval" (report on it, tune nothing on it)
    source: str  # original repository, file and licence


def packaged_traces(model: str | None = None, role: str | None = None) -> list[PackagedTrace]:
    """The shipped traces, optionally filtered by model shape name and role, in manifest order."""
    if role is not None and role not in ROLES:
        raise TraceError(f"unknown trace role {role!r}; known: {', '.join(ROLES)}")
    try:
        entries = json.loads(MANIFEST.read_text(encoding="utf-8"))["traces"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise TraceError(f"packaged trace manifest {MANIFEST} unreadable: {exc}") from None
    found = [PackagedTrace(TRACES_DIR / e["file"], e["model"], e["role"], e["source"]) for e in entries]
    if model is not None:
        known = sorted({t.model for t in found})
        if model not in known:
            raise TraceError(f"no packaged traces for model {model!r}; models with traces: {', '.join(known)}")
    return [t for t in found if (model is None or t.model == model) and (role is None or t.role == role)]


def rebuild_packaged_traces(src: str | os.PathLike, dst: str | os.PathLike = TRACES_DIR) -> list[dict]:
    """Convert every original trace under `src` into `dst`/<model>/<name>.jsonl.gz and write the manifest."""
    from hybrimoe.trace.importers import load_any_trace

    src, dst = Path(src), Path(dst)
    entries = []
    for original, (role, source) in ORIGINALS.items():
        trace = load_any_trace(src / original)
        name = Path(original).name.split(".")[0]
        rel = f"{trace.header.model}/{name}.jsonl.gz"
        (dst / trace.header.model).mkdir(parents=True, exist_ok=True)
        trace.header.source = f"{source}: {original}"
        for token in trace.tokens:  # 4 decimals: the recorders' routers ran in bf16 (~3 significant digits)
            for routing in token.layers.values():
                routing.weights = [round(w, WEIGHT_DECIMALS) for w in routing.weights]
        trace.save(dst / rel)
        entries.append({"model": trace.header.model, "file": rel, "role": role, "source": source,
                        "original": original, "sequences": len(trace.sequences()), "tokens": len(trace.tokens),
                        "prefill_tokens": sum(t.phase == "prefill" for t in trace.tokens),
                        "weight_decimals": WEIGHT_DECIMALS})
    (dst / "manifest.json").write_text(json.dumps({"traces": entries}, indent=1) + "\n", encoding="utf-8")
    return entries
