"""`hybrimoe plan` memory figures against what the runtime really allocates, for tiny checkpoints of
every family and every expert format; the recommended command's sizes; refusals with by how much."""

from __future__ import annotations

import random

import pytest
import torch

from hybrimoe.errors import BudgetError
from hybrimoe.loader import load_model
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.plan.build import make_plan
from hybrimoe.plan.memory import Machine, device_budget, format_memory, pinned_bytes
from hybrimoe.plan.predict import format_costs
from hybrimoe.plan.recommend import size_arg
from hybrimoe.plan.target import resolve_target
from hybrimoe.policy.cost import CostModel
from hybrimoe.runtime_options import parse_bytes
from hybrimoe.tiny import FAMILIES

CONTEXT = 24


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_equals_what_the_runtime_allocates(tiny_checkpoint, family):
    """Dense part, expert bytes, host store and KV cache at the context: the plan's figures equal the
    bytes of the loaded model's parameters, its ExpertStore and its KVCache after a forward."""
    path = tiny_checkpoint(family)
    target = resolve_target(str(path))
    assert target.config is not None and target.checkpoint
    machine = Machine(gpu_bytes=10**9, host_bytes=10**12, context=CONTEXT, reserve_bytes=0, device="cpu")
    for name in ("bf16", "int8", "int4"):
        mem = format_memory(target, ExpertFormat.parse(name, torch.bfloat16), machine)
        model = load_model(path, dtype="bf16", expert_dtype=name, progress=False)
        dense = sum(p.numel() * p.element_size() for p in model.parameters()) + \
            sum(b.numel() * b.element_size() for b in model.buffers())
        assert mem.dense_bytes == dense, (family, name)
        assert mem.expert_bytes == model.expert_store.expert_nbytes, (family, name)
        assert mem.store_bytes == model.expert_store.nbytes == mem.host_bytes, (family, name)  # cpu: not pinned
        kv = model.new_kv_cache(CONTEXT)
        model.forward(torch.arange(5) % model.config.vocab_size, 0, kv)
        assert mem.kv_bytes == kv.nbytes(), (family, name)


def test_pinned_store_rounds_up_to_a_power_of_two():
    assert [pinned_bytes(n) for n in (1, 2, 3, 4096, 4097, 28_000_000_000)] == [1, 2, 4, 4096, 8192, 2 ** 35]
    target = resolve_target("mixtral-8x7b")
    mem = format_memory(target, ExpertFormat.parse("int4", torch.bfloat16),
                        Machine(24 * 10**9, 64 * 10**9, 4096, device="cuda"))
    assert mem.pinned and mem.host_bytes == 2 ** 35 > mem.store_bytes
    # only the pageable store fits: not pinned, so the command says --no-pin-memory
    mem = format_memory(target, ExpertFormat.parse("int4", torch.bfloat16),
                        Machine(24 * 10**9, 30 * 10**9, 4096, device="cuda"))
    assert not mem.pinned and mem.host_bytes == mem.store_bytes


@pytest.mark.parametrize("kernel, factor, phrase", [("onnxruntime", 1.5, "onnxruntime's packed copy"),
                                                   ("ggml", 0.9, "ggml's copy")])
def test_a_cpu_kernel_counts_its_copy_and_takes_int4_only(kernel, factor, phrase):
    """--cpu-kernel onnxruntime|ggml: the runtime keeps the store for its copies and the kernel makes its own
    (onnxruntime 1.5x the int4 bytes, ggml 0.9x), so both are host memory; a pinned store that no longer fits
    beside it goes pageable."""
    target = resolve_target("mixtral-8x7b")
    int4 = ExpertFormat.parse("int4" if kernel == "onnxruntime" else "q4_0", torch.bfloat16)
    store = format_memory(target, int4, Machine(24 * 10**9, 200 * 10**9, 4096, device="cpu")).store_bytes
    for host, fits in ((int((1 + factor) * store) + 10**6, True), (int((1 + factor) * store) - 10**6, False)):
        machine = Machine(24 * 10**9, host, 4096, device="cpu", cpu_kernel=kernel)
        mem = format_memory(target, int4, machine)
        assert mem.kernel_bytes == int(factor * store) and mem.host_fits == fits
        b = device_budget(target, mem, machine, "hybrimoe")
        assert b.fits == fits and (fits or phrase in b.reason)
    assert format_memory(target, int4, Machine(24 * 10**9, 200 * 10**9, 4096, device="cpu")).kernel_bytes == 0
    cuda = Machine(24 * 10**9, int((1 + factor) * store) + 10**9, 4096, device="cuda", cpu_kernel=kernel)
    assert not format_memory(target, int4, cuda).pinned  # pinned (power of two) + the copy would not fit
    bf16 = format_memory(target, ExpertFormat.parse("bf16", torch.bfloat16), cuda)
    assert "computes int4 experts" in device_budget(target, bf16, cuda, "hybrimoe").reason
    if kernel == "ggml":  # asymmetric int4 would be Q4_1: no fast ggml kernel
        asym = format_memory(target, ExpertFormat.parse("int4", torch.bfloat16), cuda)
        assert "q4_0" in device_budget(target, asym, cuda, "hybrimoe").reason


def test_size_arg_reads_back_inside_its_range():
    rng = random.Random(0)
    for _ in range(2000):
        low = rng.randrange(0, 10 ** rng.randrange(1, 12))
        high = low + rng.randrange(0, 10 ** rng.randrange(0, 11))
        text = size_arg(low, high)
        assert low <= parse_bytes(text) <= high, (low, high, text)
    assert size_arg(18_496_000_000, 18_606_000_000) == "18.6GB"  # the largest short value <= high


def test_budget_refusals_say_by_how_much():
    target = resolve_target("qwen2-57b-a14b")
    fmt = ExpertFormat.parse("int4", torch.bfloat16)
    mem = format_memory(target, fmt, Machine(12 * 10**9, 128 * 10**9, 4096, device="cuda"))
    b = device_budget(target, mem, Machine(12 * 10**9, 128 * 10**9, 4096, device="cuda"), "ktransformers")
    need = mem.dense_bytes + mem.kv_bytes + mem.transient_bytes + 10**9
    assert not b.fits and f"need {need / 1e9:.1f} GB, {(need - 12 * 10**9) / 1e9:.1f} GB more than 12.0 GB" in b.reason
    small = Machine(48 * 10**9, 16 * 10**9, 4096, device="cuda")
    mem = format_memory(target, fmt, small)
    b = device_budget(target, mem, small, "hybrimoe")
    assert not b.fits and f"{(mem.host_bytes - 16 * 10**9) / 1e9:.1f} GB more than 16.0 GB" in b.reason


def test_nothing_fits_is_refused_with_the_closest_format():
    target = resolve_target("mixtral-8x7b")
    profile = CostModel.load("desktop-4090")
    machine = Machine(24 * 10**9, 20 * 10**9, 4096, device="cuda")
    plan = make_plan(target, machine, lambda m: format_costs(profile, target.shape, m.expert_bytes, "bf16"),
                     profile.name)
    assert plan.routing is None and not any(r.prediction for r in plan.rows)
    with pytest.raises(BudgetError, match=r"even int4 \(group 32\) experts take 28\.2 GB of host memory, 8\.2 GB more"):
        from hybrimoe.plan.build import check_fits
        check_fits(plan)
