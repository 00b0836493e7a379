"""Checks shared by the CPU-kernel tests (onnxruntime's and ggml's): the decode graphs against the torch path
(logits, KV cache), and the hybrid runtime's presets with the CPU side on a kernel's experts."""

from __future__ import annotations

from typing import Any

import torch


def cache_roundtrip(model: torch.nn.Module, graph: bool) -> torch.Tensor:
    """Logits of decode tokens into an empty cache, a 3-token forward (torch path) over that cache, a rewind
    to 2 cached tokens and one more token; with `model.ort_decoder` on (`graph`) or off."""
    decoder, model.ort_decoder = model.ort_decoder, (model.ort_decoder if graph else None)
    try:
        kv = model.new_kv_cache(32)
        out = [model(torch.tensor([11]), 0, kv)]                        # decode into an empty cache
        out += [model(torch.tensor([t]), 1 + i, kv) for i, t in enumerate([4, 9, 250])]
        out.append(model(torch.tensor([8, 1, 30]), 4, kv))             # a prompt chunk reads it
        out.append(model(torch.tensor([99]), 2, kv))                    # rewind to 2 cached tokens
        out.append(model(torch.tensor([5]), 3, kv))
        return torch.cat(out)
    finally:
        model.ort_decoder = decoder


def torch_path_and_graph(model: torch.nn.Module, decode: Any, monkeypatch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(`decode(model, graph=False)`, `decode(model, graph=True)`, how many `Attention.forward` calls the
    latter made: a decode token that ran the graphs makes none)."""
    from hybrimoe.models.attention import Attention

    want = decode(model, graph=False)
    calls = []
    forward = Attention.forward
    monkeypatch.setattr(Attention, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    return want, decode(model, graph=True), len(calls)


def under_each_policy(model: torch.nn.Module, policy: str, expert_cls: type, run: Any,
                      monkeypatch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(`run(model)` plain, `run(model)` under the hybrid runtime with preset `policy` at 25% cache, how many
    times `expert_cls.forward` ran): the CPU side computes on the kernel's experts."""
    from hybrimoe.moe.install import install_runtime
    from hybrimoe.policy.plan import LinearCosts
    from hybrimoe.runtime_options import RuntimeOptions

    want = run(model)
    calls = []
    forward = expert_cls.forward
    monkeypatch.setattr(expert_cls, "forward", lambda self, x: calls.append(1) or forward(self, x))
    costs = LinearCosts(cpu_per_token=2e-5, gpu_fixed=3e-5, copy_seconds=6e-5, cpu_fixed=2e-5, cpu_first_extra=1e-5)
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=0.25, cpu_threads=1), costs=costs)
    try:
        got = run(model)
    finally:
        runtime.close()
    return want, got, len(calls)
