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
Batch B (`batch`, continuous batching of B sequences): the prompt is as above (one prefill forward
of one sequence: prefills run per sequence), and every decode step carries B tokens, one per LANE.
The trace's decode-phase tokens, in the order above, form one stream of N tokens; lane i starts at
offset floor(i * N / B) of it and steps through it, wrapping at its end, so step k carries the
tokens (floor(i * N / B) + k) mod N, i = 0..B-1: B different real routings at every step (B <= N is
required), deterministic. The number of steps is that of batch 1 (min(N, max_decode)); lane 0 is
batch 1's decode, so batch 1 is the workload above unchanged. With one or two sequences per packaged
trace, lanes are windows of the trace's decode stream rather than whole sequences.
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
    decode: list[TokenRouting]  # lane 0's decode tokens (batch 1: one forward per token)
    wrapped: bool = False  # the prompt cycles the trace
    notes: list[str] = field(default_factory=list)
    batch: int = 1  # sequences decoded together (tokens per decode step)
    # one list per decode forward: the B tokens of the step, lane order (batch 1: [[t] for t in decode])
    decode_steps: list[list[TokenRouting]] = field(default_factory=list)


def build_workload(trace: RoutingTrace, prompt_tokens: int | None = None,
                   max_decode: int | None = None, batch: int = 1) -> Workload:
    """The prompt and decode steps of `trace` (module doc); `batch` sequences per decode step."""
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    workload = _batch1(trace, prompt_tokens, max_decode)
    stream = workload.decode_steps = [[t] for t in workload.decode]
    if batch == 1:
        return workload
    everything = _decode_stream(trace)
    n = len(everything)
    if n and n < batch:
        raise ConfigError(f"batch {batch} needs at least {batch} decode tokens in the trace (one per sequence "
                          f"at each step), it has {n}")
    offsets = [i * n // batch for i in range(batch)]
    workload.batch = batch
    workload.decode_steps = [[everything[(o + k) % n] for o in offsets] for k in range(len(stream))]
    if len(stream) + offsets[-1] > n:
        workload.notes.append(f"batch {batch}: lanes start every ~{n / batch:.1f} of the trace's {n} decode "
                              f"tokens and wrap at its end")
    return workload


def _decode_stream(trace: RoutingTrace) -> list[TokenRouting]:
    """Every complete decode-phase token of `trace`, sequences in order (batch 1's decode, uncut)."""
    return _batch1(trace, None, None).decode


def _batch1(trace: RoutingTrace, prompt_tokens: int | None, max_decode: int | None) -> Workload:
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
