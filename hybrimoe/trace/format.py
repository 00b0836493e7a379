"""The project's routing-trace format (documented in docs/TRACE_FORMAT.md).

A trace is JSON Lines, optionally gzip-compressed (name ending in `.gz`):
- line 1, the header: {"format": "hybrimoe-trace", "version": 1, "model": str, "num_layers": int,
  "num_experts": int, "top_k": int, "moe_layers": [int, ...], "source": str}
- then one line per token, in order within each sequence:
  {"seq": int, "pos": int, "phase": "prefill"|"decode", "token_id": int|null,
   "layers": {"<layer>": {"experts": [int]*k, "weights": [float]*k, "scores": [float]*E | absent}}}
`experts` are the experts the model actually used, `weights` their combine weights, `scores` the
full router score vector (softmax, or sigmoid for DeepSeek-V3) when the recorder had it.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from hybrimoe.errors import TraceError

FORMAT_NAME = "hybrimoe-trace"
FORMAT_VERSION = 1
PHASES = ("prefill", "decode")


@dataclass
class LayerRouting:
    experts: list[int]
    weights: list[float]
    scores: list[float] | None = None  # [E], full router score vector when known


@dataclass
class TokenRouting:
    seq: int
    pos: int
    phase: str  # "prefill" | "decode"
    layers: dict[int, LayerRouting]
    token_id: int | None = None


@dataclass
class TraceHeader:
    model: str
    num_layers: int  # layers of the model (dense ones included)
    num_experts: int  # routed experts per MoE layer
    top_k: int
    moe_layers: list[int]
    source: str = ""


@dataclass
class RoutingTrace:
    header: TraceHeader
    tokens: list[TokenRouting] = field(default_factory=list)

    def sequences(self) -> dict[int, list[TokenRouting]]:
        """Tokens grouped by sequence id, each list in position order."""
        groups: dict[int, list[TokenRouting]] = {}
        for token in self.tokens:
            groups.setdefault(token.seq, []).append(token)
        for seq_tokens in groups.values():
            seq_tokens.sort(key=lambda t: t.pos)
        return groups

    def save(self, path: str | os.PathLike) -> None:
        with TraceWriter(path, self.header) as writer:
            for token in self.tokens:
                writer.write(token)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        header, tokens = _read(Path(path))
        return cls(header, list(tokens))


def _open(path: Path, mode: str, gz: bool | None = None) -> IO[str]:
    if gz is None:
        gz = path.suffix == ".gz"
    if gz:
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def _round(values: Iterable[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


def token_to_json(token: TokenRouting) -> dict:
    layers = {}
    for layer, routing in token.layers.items():
        entry: dict = {"experts": [int(e) for e in routing.experts], "weights": _round(routing.weights)}
        if routing.scores is not None:
            entry["scores"] = _round(routing.scores)
        layers[str(layer)] = entry
    return {"seq": token.seq, "pos": token.pos, "phase": token.phase, "token_id": token.token_id,
            "layers": layers}


class TraceWriter:
    """Streams a trace to `path`; the file appears only when the writer closes without error."""

    def __init__(self, path: str | os.PathLike, header: TraceHeader) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = _open(self._tmp, "w", gz=self.path.suffix == ".gz")
        self._file.write(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **vars(header)}) + "\n")

    def write(self, token: TokenRouting) -> None:
        self._file.write(json.dumps(token_to_json(token)) + "\n")

    def close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read(path: Path) -> tuple[TraceHeader, Iterator[TokenRouting]]:
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}")
    try:
        with _open(path, "r") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from None
    if not lines:
        raise TraceError(f"{path} is empty; expected a '{FORMAT_NAME}' header line")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:1: header is not JSON ({exc})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT_NAME:
        raise TraceError(f"{path}:1: not a {FORMAT_NAME} file (for the original Mixtral/Qwen trace "
                         "formats use `hybrimoe import-trace`)")
    if head.get("version") != FORMAT_VERSION:
        raise TraceError(f"{path}: trace version {head.get('version')!r} is not supported "
                         f"(this build reads version {FORMAT_VERSION})")
    try:
        header = TraceHeader(model=str(head["model"]), num_layers=int(head["num_layers"]),
                             num_experts=int(head["num_experts"]), top_k=int(head["top_k"]),
                             moe_layers=[int(x) for x in head["moe_layers"]], source=str(head.get("source", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}:1: bad header field ({exc!r})") from None
    tokens = [_parse_token(path, number, line, header) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    return header, iter(tokens)


def _parse_token(path: Path, number: int, line: str, header: TraceHeader) -> TokenRouting:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
        phase = obj["phase"]
        if phase not in PHASES:
            raise TraceError(f"{where}: phase {phase!r} is not one of {PHASES}")
        layers: dict[int, LayerRouting] = {}
        for key, entry in obj["layers"].items():
            experts = [int(e) for e in entry["experts"]]
            weights = [float(w) for w in entry["weights"]]
            scores = entry.get("scores")
            if len(experts) != len(weights):
                raise TraceError(f"{where}: layer {key} has {len(experts)} experts but {len(weights)} weights")
            if any(not 0 <= e < header.num_experts for e in experts):
                raise TraceError(f"{where}: layer {key} names an expert outside 0..{header.num_experts - 1}")
            if scores is not None and len(scores) != header.num_experts:
                raise TraceError(f"{where}: layer {key} has {len(scores)} scores, expected {header.num_experts}")
            layers[int(key)] = LayerRouting(experts, weights, None if scores is None else [float(s) for s in scores])
        token_id = obj.get("token_id")
        return TokenRouting(seq=int(obj["seq"]), pos=int(obj["pos"]), phase=phase, layers=layers,
                            token_id=None if token_id is None else int(token_id))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TraceError(f"{where}: malformed token record ({exc!r})") from None
