"""Turn a routing trace into a workload: one prefill forward (the prompt) and decode forwards.

- Without `prompt_tokens`: the prompt is the trace's own prefill tokens of its first sequence that
  has any (none: no prefill forward); decode steps are every decode-phase token.
- With `prompt_tokens` = N: the prompt is the first N tokens of the trace, sequences joined in
  order (prefill tokens, then decode tokens, of each sequence); when the trace has fewer than N
  tokens it is cycled and `wrapped` says so (the routing of a repeated token is a real routing,
  but the per-expert counts of such a prompt are those of the trace repeated). Decode steps are
  still the trace's decode-phase tokens.
Tokens that lack routing for one of the trace's MoE layers are left out of the workload (a note says
how many): the importers drop them already, this guards traces written elsewhere, which would
otherwise make the missing layers free (dense time only).
Traces without phase markers (Mixtral files recorded in one call per problem; see
`import_mixtral_jsonl`) mark every token "decode", so their decode steps are all
tokens, and an N-token prompt takes the first N of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrimoe.errors import ConfigError
from hybrimoe.trace.format import RoutingTrace, TokenRouting


@dataclass
class Workload:
    prefill: list[TokenRouting]  # one forward of len(prefill) tokens (may be empty)
    decode: list[TokenRouting]  # one forward per token
    wrapped: bool = False  # the prompt cycles the trace
    notes: list[str] = field(default_factory=list)


def build_workload(trace: RoutingTrace, prompt_tokens: int | None = None,
                   max_decode: int | None = None) -> Workload:
    seqs = trace.sequences()
    layers = set(trace.header.moe_layers)
    skipped = 0
    for seq in seqs:
        complete = [t for t in seqs[seq] if layers <= t.layers.keys()]
        skipped += len(seqs[seq]) - len(complete)
        seqs[seq] = complete
    seqs = {s: toks for s, toks in seqs.items() if toks}
    skip_notes = [f"{skipped} trace tokens lacking routing for some MoE layer left out"] if skipped else []
    ordered: list[TokenRouting] = []
    for seq in sorted(seqs):
        toks = seqs[seq]
        ordered += [t for t in toks if t.phase == "prefill"] + [t for t in toks if t.phase == "decode"]
    decode = [t for t in ordered if t.phase == "decode"]
    if max_decode is not None:
        decode = decode[:max_decode]
    if prompt_tokens is None:
        first = next((s for s in sorted(seqs) if any(t.phase == "prefill" for t in seqs[s])), None)
        prefill = [] if first is None else [t for t in seqs[first] if t.phase == "prefill"]
        notes = [] if prefill else ["trace has no prefill tokens: no prefill forward simulated"]
        return Workload(prefill, decode, False, skip_notes + notes)
    if prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    if not ordered:
        raise ConfigError("trace has no tokens")
    wrapped = prompt_tokens > len(ordered)
    prefill = [ordered[i % len(ordered)] for i in range(prompt_tokens)]
    notes = [f"prompt of {prompt_tokens} tokens cycles the trace's {len(ordered)} tokens"] if wrapped else []
    return Workload(prefill, decode, wrapped, skip_notes + notes)
