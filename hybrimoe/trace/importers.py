"""Importers of the original public routing-trace formats (see ../shared/traces/README.md).

- Mixtral JSON Lines: one object per (token, layer) line, `{"dataset", "problem_id", "layer",
  "token_idx" | "token_pos", "experts", "gating_probs"}`; lines are in no guaranteed order.
- Qwen JSON: one object per prompt, `{"meta", "prompt_tokens", "generated_tokens", "routes": [...]}`.

`load_any_trace(path)` recognises the project's own format too, so every tool that takes a trace
accepts all three.

Incomplete tokens: a token whose routing is absent for some MoE layer (the original file lacks that
(token, layer) record) is dropped by both importers and counted in the header's `source` (Mixtral
humaneval_alt: 199 of 6,976 (token, layer) records absent, 2.9%, spread over 124 of its 218 tokens). Kept, such a token
would make its missing layers free in a simulation (dense time only); inventing the missing routing
is not an option. `keep_incomplete=True` keeps them as they are (for studying the files).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from hybrimoe.errors import TraceError
from hybrimoe.trace.format import (
    FORMAT_NAME,
    LayerRouting,
    RoutingTrace,
    TokenRouting,
    TraceHeader,
)

log = logging.getLogger(__name__)

MIXTRAL_MODEL = "mixtral-8x7b"
MIXTRAL_LAYERS = 32
MIXTRAL_EXPERTS = 8
MIXTRAL_TOP_K = 2


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from None


def shape_name_from_model_id(model_id: str) -> str:
    """'./models/Qwen1.5-MoE-A2.7B-Chat-4bit' -> 'qwen1.5-moe-a2.7b' (the named-shape spelling)."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"-(\d+bit|fp8|bf16|fp16|awq|gptq|mlx)$", "", name)
    name = re.sub(r"-(chat|instruct)(-v[\d.]+)?$", "", name)
    return name


# ---------------------------------------------------------------------------------------------
# Mixtral JSON Lines


def _mixtral_record(path: Path, number: int, line: str) -> tuple[int, int, int, list[int], list[float]]:
    """One line -> (problem_id, position within its forward call, layer, experts, weights)."""
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    pos_key = "token_idx" if "token_idx" in obj else "token_pos"
    try:
        problem, pos, layer = int(obj["problem_id"]), int(obj[pos_key]), int(obj["layer"])
        experts = [int(e) for e in obj["experts"]]
        weights = [float(w) for w in obj["gating_probs"]]
    except KeyError as exc:
        raise TraceError(f"{where}: missing field {exc} (expected problem_id, layer, token_idx or "
                         "token_pos, experts, gating_probs)") from None
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{where}: malformed field ({exc})") from None
    if len(experts) != MIXTRAL_TOP_K or len(weights) != len(experts):
        raise TraceError(f"{where}: expected {MIXTRAL_TOP_K} experts and as many gating_probs, "
                         f"got {len(experts)} and {len(weights)}")
    if not 0 <= layer < MIXTRAL_LAYERS:
        raise TraceError(f"{where}: layer {layer} outside 0..{MIXTRAL_LAYERS - 1}")
    if any(not 0 <= e < MIXTRAL_EXPERTS for e in experts):
        raise TraceError(f"{where}: expert ids {experts} outside 0..{MIXTRAL_EXPERTS - 1}")
    if pos < 0:
        raise TraceError(f"{where}: negative token position {pos}")
    return problem, pos, layer, experts, weights


def drop_incomplete_tokens(trace: RoutingTrace) -> int:
    """Removes, in place, every token that lacks routing for one of the header's MoE layers; returns
    how many were removed and notes it in `trace.header.source`."""
    layers = set(trace.header.moe_layers)
    kept = [t for t in trace.tokens if layers <= t.layers.keys()]
    dropped = len(trace.tokens) - len(kept)
    if trace.tokens and not kept:
        raise TraceError(f"{trace.header.source}: every token lacks routing for some of the MoE layers "
                         f"{trace.header.moe_layers[0]}..{trace.header.moe_layers[-1]}")
    if dropped:
        by_phase = {p: sum(t.phase == p for t in trace.tokens if not layers <= t.layers.keys())
                    for p in ("prefill", "decode")}
        log.warning("%s: dropped %d of %d tokens that lack routing for some MoE layer (%d prefill, %d decode)",
                    trace.header.source, dropped, len(trace.tokens), by_phase["prefill"], by_phase["decode"])
        trace.header.source += f" ({dropped} of {len(trace.tokens)} tokens lacking a MoE layer dropped)"
        trace.tokens[:] = kept
    return dropped


def import_mixtral_jsonl(path: str | os.PathLike, model: str = MIXTRAL_MODEL,
                         keep_incomplete: bool = False) -> RoutingTrace:
    """Read a Mixtral routing JSONL file as it is.

    Sequences are the `problem_id`s, in order of first appearance. Within a problem, the recorder
    writes each forward call layer by layer, with positions relative to that call: a file that
    generated with a KV cache holds one multi-token call (the prompt) and then one-token calls whose
    position is 0 again. A (position, layer) pair that repeats inside the current call therefore
    starts the next call; its positions continue after the previous call's last one. A problem
    recorded in one call has no phase information: all its tokens are "decode" (the README's rule).
    A problem with several calls: tokens of the first call are "prefill", later ones "decode".
    A token with absent (position, layer) lines is dropped (see the module doc) unless `keep_incomplete`.
    """
    path = Path(path)
    calls: dict[int, list[dict[tuple[int, int], tuple[list[int], list[float]]]]] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        problem, pos, layer, experts, weights = _mixtral_record(path, number, line)
        problem_calls = calls.setdefault(problem, [{}])
        if (pos, layer) in problem_calls[-1]:
            problem_calls.append({})
        problem_calls[-1][(pos, layer)] = (experts, weights)
    if not calls:
        raise TraceError(f"{path}: no routing records")
    header = TraceHeader(model=model, num_layers=MIXTRAL_LAYERS, num_experts=MIXTRAL_EXPERTS,
                         top_k=MIXTRAL_TOP_K, moe_layers=list(range(MIXTRAL_LAYERS)),
                         source=f"mixtral-jsonl:{path.name}")
    trace = RoutingTrace(header)
    missing = 0
    for seq, (problem, problem_calls) in enumerate(calls.items()):
        offset = 0
        for call_index, call in enumerate(problem_calls):
            phase = "prefill" if call_index == 0 and len(problem_calls) > 1 else "decode"
            positions = sorted({pos for pos, _ in call})
            for pos in positions:
                layers = {layer: LayerRouting(*call[(pos, layer)]) for layer in range(MIXTRAL_LAYERS)
                          if (pos, layer) in call}
                missing += MIXTRAL_LAYERS - len(layers)
                trace.tokens.append(TokenRouting(seq=problem, pos=offset + pos, phase=phase, layers=layers))
            offset += positions[-1] + 1
    if missing:
        log.info("%s: %d (token, layer) records absent from the file", path.name, missing)
    if not keep_incomplete:
        drop_incomplete_tokens(trace)
    return trace


# ---------------------------------------------------------------------------------------------
# Qwen JSON


def _qwen_route(path: Path, index: int, route: Any, num_experts: int) -> TokenRouting:
    where = f"{path}: routes[{index}]"
    if not isinstance(route, dict):
        raise TraceError(f"{where}: expected an object, got {type(route).__name__}")
    try:
        phase = route["phase"]
        if phase not in ("prefill", "decode"):
            raise TraceError(f"{where}: phase {phase!r} is not 'prefill' or 'decode'")
        layers: dict[int, LayerRouting] = {}
        for key, entry in route["layers"].items():
            experts = [int(e) for e in entry["experts"]]
            weights = [float(w) for w in entry["weights"]]
            if len(experts) != len(weights):
                raise TraceError(f"{where}: layer {key} has {len(experts)} experts but {len(weights)} weights")
            if any(not 0 <= e < num_experts for e in experts):
                raise TraceError(f"{where}: layer {key} names an expert outside 0..{num_experts - 1}")
            layers[int(key)] = LayerRouting(experts, weights)
        token_id = route.get("token_id")
        return TokenRouting(seq=0, pos=int(route["token_pos"]), phase=phase, layers=layers,
                            token_id=None if token_id is None else int(token_id))
    except KeyError as exc:
        raise TraceError(f"{where}: missing field {exc} (expected token_pos, phase, layers)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise TraceError(f"{where}: malformed route ({exc!r})") from None


def import_qwen_json(path: str | os.PathLike, model: str | None = None, keep_incomplete: bool = False) -> RoutingTrace:
    """Read a Qwen routing JSON file (one prompt) as it is; phases come from each route's `phase`.
    MoE layers = every layer some route names; a route lacking one of them is dropped unless
    `keep_incomplete` (see the module doc)."""
    path = Path(path)
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or "meta" not in obj or "routes" not in obj:
        raise TraceError(f"{path}: not a Qwen routing file (expected an object with 'meta' and 'routes')")
    meta = obj["meta"]
    try:
        num_layers, num_experts, top_k = int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"])
        model_id = str(meta.get("model_id", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: bad 'meta' (needs num_layers, num_experts, top_k): {exc!r}") from None
    routes = obj["routes"]
    if not isinstance(routes, list) or not routes:
        raise TraceError(f"{path}: 'routes' must be a non-empty list")
    tokens = [_qwen_route(path, i, r, num_experts) for i, r in enumerate(routes)]
    moe_layers = sorted({layer for t in tokens for layer in t.layers})
    if moe_layers and not 0 <= moe_layers[0] <= moe_layers[-1] < num_layers:
        raise TraceError(f"{path}: layer ids {moe_layers[0]}..{moe_layers[-1]} outside 0..{num_layers - 1}")
    header = TraceHeader(model=model or shape_name_from_model_id(model_id), num_layers=num_layers,
                         num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                         source=f"qwen-json:{path.name} ({model_id}, backend {meta.get('backend', '?')})")
    trace = RoutingTrace(header, tokens)
    if not keep_incomplete:
        drop_incomplete_tokens(trace)
    return trace


# ---------------------------------------------------------------------------------------------
# Detection


def detect_format(path: str | os.PathLike) -> str:
    """'project', 'mixtral-jsonl' or 'qwen-json', from the file's first bytes."""
    path = Path(path)
    text = _read_text(path)
    head = text.lstrip()[:4096]
    first_line = text.lstrip().split("\n", 1)[0]
    try:
        first = json.loads(first_line)
    except json.JSONDecodeError:
        first = None
    if isinstance(first, dict) and first.get("format") == FORMAT_NAME:
        return "project"
    if isinstance(first, dict) and "problem_id" in first and "experts" in first:
        return "mixtral-jsonl"
    if head.startswith("{") and '"meta"' in head:
        return "qwen-json"
    raise TraceError(f"{path}: unknown trace format (accepted: the project's '{FORMAT_NAME}' JSONL, "
                     "Mixtral routing JSONL with problem_id/layer/experts, Qwen routing JSON with meta/routes)")


def load_any_trace(path: str | os.PathLike) -> RoutingTrace:
    """Load a trace in any supported format (detected from the content, not the name)."""
    kind = detect_format(path)
    if kind == "project":
        return RoutingTrace.load(path)
    if kind == "mixtral-jsonl":
        return import_mixtral_jsonl(path)
    return import_qwen_json(path)
