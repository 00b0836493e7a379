"""Importers of the original trace formats, checked against the facts in ../shared/traces/README.md."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from hybrimoe.cli import main as cli_main
from hybrimoe.data import packaged_traces
from hybrimoe.errors import TraceError
from hybrimoe.trace import RoutingTrace
from hybrimoe.trace.importers import (detect_format, import_mixtral_jsonl, import_qwen_json, load_any_trace,
                                      shape_name_from_model_id)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/traces")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared traces folder absent")


def reuse_fraction(trace: RoutingTrace) -> float:
    """Fraction of a token's experts that the previous token of its sequence used in the same layer."""
    shared = total = 0
    for tokens in trace.sequences().values():
        for prev, cur in zip(tokens, tokens[1:]):
            for layer, routing in cur.layers.items():
                if layer in prev.layers:
                    shared += len(set(routing.experts) & set(prev.layers[layer].experts))
                    total += len(routing.experts)
    return shared / total


@needs_shared
def test_mixtral_gsm8k_facts() -> None:
    path = SHARED / "mixtral-8x7b" / "gsm8k.jsonl"
    assert sum(1 for _ in path.open()) == 7889
    trace = import_mixtral_jsonl(path, keep_incomplete=True)  # the file's facts, every record as it is
    assert detect_format(path) == "mixtral-jsonl"
    assert trace.header.model == "mixtral-8x7b" and trace.header.top_k == 2
    assert sorted(trace.sequences()) == [0, 1]
    assert {layer for t in trace.tokens for layer in t.layers} == set(range(32))
    assert sum(len(t.layers) for t in trace.tokens) == 7889  # every line lands in exactly one place
    assert {len(v) for v in trace.sequences().values()} == {168, 79}
    assert all(t.phase == "decode" for t in trace.tokens)
    assert round(reuse_fraction(trace), 2) == 0.34


@needs_shared
def test_mixtral_restarting_positions_become_decode_steps() -> None:
    trace = import_mixtral_jsonl(SHARED / "mixtral-8x7b" / "humaneval_alt.jsonl", keep_incomplete=True)
    tokens = trace.sequences()[0]
    assert [t.pos for t in tokens] == list(range(len(tokens)))
    assert sum(t.phase == "prefill" for t in tokens) == 135
    assert all(t.phase == "decode" for t in tokens[135:])
    assert sum(len(t.layers) for t in tokens) == 6777


@needs_shared
def test_tokens_lacking_a_moe_layer_are_dropped_and_counted() -> None:
    """humaneval_alt lacks 199 of its 218 x 32 (token, layer) records, spread over 124 tokens; kept,
    their missing layers would cost no expert work in a simulation. The importer drops exactly those
    tokens and says so in the header."""
    path = SHARED / "mixtral-8x7b" / "humaneval_alt.jsonl"
    full = import_mixtral_jsonl(path, keep_incomplete=True)
    assert 218 * 32 - sum(len(t.layers) for t in full.tokens) == 199
    trace = import_mixtral_jsonl(path)
    assert len(trace.tokens) == 94 and all(len(t.layers) == 32 for t in trace.tokens)
    assert sum(t.phase == "prefill" for t in trace.tokens) == 59
    complete = [(t.pos, t.phase) for t in full.tokens if len(t.layers) == 32]
    assert [(t.pos, t.phase) for t in trace.tokens] == complete  # the complete ones, in order, unchanged
    assert "124 of 218 tokens lacking a MoE layer dropped" in trace.header.source
    packaged = RoutingTrace.load(next(t.path for t in packaged_traces("mixtral-8x7b", "eval")
                                      if t.path.name.startswith("humaneval_alt")))
    assert [(t.pos, t.phase) for t in packaged.tokens] == complete


@needs_shared
def test_qwen_cooking_facts() -> None:
    path = SHARED / "qwen1.5-moe-a2.7b" / "cooking_1.json"
    trace = load_any_trace(path)
    assert detect_format(path) == "qwen-json"
    assert trace.header.model == "qwen1.5-moe-a2.7b"
    assert (trace.header.num_layers, trace.header.num_experts, trace.header.top_k) == (24, 60, 4)
    assert len(trace.tokens) == 185
    assert sum(t.phase == "prefill" for t in trace.tokens) == 57
    assert sum(t.phase == "decode" for t in trace.tokens) == 128
    assert trace.header.moe_layers == list(range(24))
    assert trace.tokens[0].token_id == 151644


def test_shape_name_from_model_id() -> None:
    assert shape_name_from_model_id("./models/Qwen1.5-MoE-A2.7B-Chat-4bit") == "qwen1.5-moe-a2.7b"
    assert shape_name_from_model_id("Qwen3.6-35B-A3B-4bit") == "qwen3.6-35b-a3b"
    assert shape_name_from_model_id("mistralai/Mixtral-8x7B-Instruct-v0.1") == "mixtral-8x7b"


def _mixtral_line(**over) -> str:
    rec = {"dataset": "d", "problem_id": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4], "token_idx": 0}
    rec.update(over)
    return json.dumps(rec)


def test_mixtral_out_of_order_lines(tmp_path: Path) -> None:
    lines = [_mixtral_line(token_idx=t, layer=l, experts=[t % 8, (t + l) % 8 if (t + l) % 8 != t % 8 else 7])
             for l in (1, 0) for t in (2, 0, 1)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    trace = import_mixtral_jsonl(path, keep_incomplete=True)  # layers 0 and 1 of Mixtral's 32
    assert [t.pos for t in trace.tokens] == [0, 1, 2]
    assert trace.tokens[2].layers[1].experts[0] == 2
    with pytest.raises(TraceError, match="every token lacks routing"):
        load_any_trace(path)


@pytest.mark.parametrize("bad, message", [
    ("not json", ":2: not JSON"),
    (_mixtral_line(experts=[1, 9]), ":2: expert ids"),
    (_mixtral_line(layer=32), ":2: layer 32"),
    (_mixtral_line(experts=[1]), ":2: expected 2 experts"),
    (json.dumps({"problem_id": 0, "layer": 0, "experts": [1, 2], "token_idx": 1}), ":2: missing field 'gating_probs'"),
])
def test_mixtral_malformed_names_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(_mixtral_line() + "\n" + bad + "\n")
    with pytest.raises(TraceError, match=message) as info:
        import_mixtral_jsonl(path)
    assert "bad.jsonl" in str(info.value)


def _qwen_obj(**route_over) -> dict:
    route = {"token_pos": 0, "token_id": 5, "phase": "prefill", "layers": {"0": {"experts": [1, 2], "weights": [0.5, 0.3]}}}
    route.update(route_over)
    return {"meta": {"model_id": "X-MoE-4bit", "num_layers": 2, "num_experts": 4, "top_k": 2}, "routes": [route]}


@pytest.mark.parametrize("over, message", [
    ({"phase": "warmup"}, r"routes\[0\]: phase 'warmup'"),
    ({"layers": {"0": {"experts": [1, 7], "weights": [0.5, 0.3]}}}, "outside 0..3"),
    ({"layers": {"5": {"experts": [1, 2], "weights": [0.5, 0.3]}}}, "outside 0..1"),
    ({"layers": {"0": {"experts": [1, 2], "weights": [0.5]}}}, "2 experts but 1 weights"),
])
def test_qwen_malformed(tmp_path: Path, over: dict, message: str) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_qwen_obj(**over)))
    with pytest.raises(TraceError, match=message) as info:
        import_qwen_json(path)
    assert "q.json" in str(info.value)


def test_unknown_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(TraceError, match="unknown trace format"):
        load_any_trace(path)
    with pytest.raises(TraceError, match="not found"):
        load_any_trace(tmp_path / "absent.jsonl")


def test_cli_merges_and_writes_gzip(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_qwen_obj()))
    b.write_text(json.dumps(_qwen_obj(phase="decode")))
    out = tmp_path / "out.jsonl.gz"
    assert cli_main(["import-trace", str(a), str(b), "--out", str(out)]) == 0
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline())["format"] == "hybrimoe-trace"
    trace = load_any_trace(out)
    assert sorted(trace.sequences()) == [0, 1] and trace.header.model == "x-moe"
    assert [t.phase for t in trace.tokens] == ["prefill", "decode"]
    c = tmp_path / "c.jsonl"
    c.write_text(_mixtral_line() + "\n")
    assert cli_main(["import-trace", str(a), str(c), "--out", str(tmp_path / "bad.jsonl")]) == 2


def test_save_trace_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "q.json"
    src.write_text(json.dumps(_qwen_obj()))
    trace = load_any_trace(src)
    trace.save(tmp_path / "t.jsonl.gz")
    again = RoutingTrace.load(tmp_path / "t.jsonl.gz")
    assert again.tokens[0].layers[0].experts == [1, 2] and again.header == trace.header


def test_packaged_traces_manifest() -> None:
    all_traces = packaged_traces()
    assert len(all_traces) == 11 and all(t.path.is_file() for t in all_traces)
    assert sum(t.path.stat().st_size for t in all_traces) < 3_000_000  # bytes: the package stays small
    assert [t.path.name for t in packaged_traces("mixtral-8x7b", "dev")] == ["gsm8k.jsonl.gz"]
    assert {t.path.name for t in packaged_traces("qwen3.6-35b-a3b", "eval")} == {"chat_vllm.jsonl.gz"}
    assert len(packaged_traces("qwen1.5-moe-a2.7b", "eval")) == 3
    with pytest.raises(TraceError, match="known: dev, eval"):
        packaged_traces(role="test")
    with pytest.raises(TraceError, match="mixtral-8x7b"):
        packaged_traces(model="gpt-4")
    gsm = RoutingTrace.load(packaged_traces("mixtral-8x7b", "dev")[0].path)
    assert round(reuse_fraction(gsm), 2) == 0.34 and len(gsm.tokens) == 244  # 3 incomplete tokens dropped


def test_packaged_roles_are_the_readmes_dev_eval_split() -> None:
    """Nothing is tuned on eval traces: the manifest's roles must be the shared README's (as
    ORIGINALS restates them), file by file; dev and eval traces never share a name."""
    from hybrimoe.data import MANIFEST, ORIGINALS

    entries = json.loads(MANIFEST.read_text())["traces"]
    assert {e["original"]: e["role"] for e in entries} == {k: v[0] for k, v in ORIGINALS.items()}
    assert {e["original"] for e in entries if e["role"] == "eval"} == {
        "mixtral-8x7b/humaneval.jsonl", "mixtral-8x7b/humaneval_alt.jsonl", "qwen1.5-moe-a2.7b/history_2.json",
        "qwen1.5-moe-a2.7b/ml_moe_2.json", "qwen1.5-moe-a2.7b/ml_moe_3.json", "qwen3.6-35b-a3b/chat_vllm.json"}
    stems = {role: {t.path.name.split(".")[0] for t in packaged_traces(role=role)} for role in ("dev", "eval")}
    assert not stems["dev"] & stems["eval"]
