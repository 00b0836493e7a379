"""Expert formats: the quantiser's rounding, torch's CPU int4 order, the kernels, the store and budgets."""

from __future__ import annotations

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import BudgetError, ConfigError
from hybrimoe.moe import kernels
from hybrimoe.moe.budget import plan_budget
from hybrimoe.moe.expert_layout import ExpertLayout, expert_nbytes
from hybrimoe.moe.int4_layout import PLAIN, _torch_pack, cpu_int4_layout
from hybrimoe.moe.quant import ExpertFormat, Int4Matrix, fake_quantize, quantize_int4, quantize_int8
from hybrimoe.moe.store import ExpertStore
from hybrimoe.policy.cost import format_bits
from hybrimoe.runtime_options import RuntimeOptions
from hybrimoe.tiny import tiny_config


def test_int8_rounds_to_the_nearest_step_per_row() -> None:
    w = torch.randn(48, 64)
    m = quantize_int8(w)
    err = (m.dequantize() - w).abs()
    assert (err <= m.scale[:, None] / 2 + 1e-7).all()
    assert m.q.abs().max() == 127  # the largest weight of a row uses the full range


def test_int4_rounds_to_the_nearest_step_per_group() -> None:
    w = torch.randn(32, 128)
    m = quantize_int4(w, 32)
    err = (m.dequantize() - w).abs().view(32, 4, 32)
    assert (err <= m.scale[..., None] / 2 + 1e-6).all()
    assert int(m.q.min()) == 0 and int(m.q.max()) == 15


@pytest.mark.parametrize("n", [64, 112, 160, 48, 2816])
def test_our_packing_is_torchs_cpu_order(n: int) -> None:
    layout = cpu_int4_layout(n)
    assert layout.cpu_kernel
    codes = torch.randint(0, 16, (n, 96), dtype=torch.uint8)
    packed = layout.pack(codes)
    assert torch.equal(packed, _torch_pack(codes).to(torch.uint8))
    assert torch.equal(layout.unpack(packed, n, 96), codes)


def test_plain_layout_round_trip_and_refused_shapes() -> None:
    assert cpu_int4_layout(40) is PLAIN  # torch's op needs rows in multiples of 16
    codes = torch.randint(0, 16, (40, 32), dtype=torch.uint8)
    assert torch.equal(PLAIN.unpack(PLAIN.pack(codes), 40, 32), codes)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_fused_cpu_kernel_and_dequantisation_agree_with_the_fp32_reimplementation(name: str, tokens: int) -> None:
    torch.manual_seed(0)
    h, i = 128, 96
    fmt = ExpertFormat(name, torch.float32, 32)
    layout = ExpertLayout(fmt, i, h)
    buffer = torch.empty(layout.numel, dtype=torch.uint8)
    gate_up, down = torch.randn(2 * i, h) * 0.1, torch.randn(h, i) * 0.1
    layout.write_matrix(buffer, 0, gate_up)
    layout.write_matrix(buffer, 1, down)
    x = torch.randn(tokens, h)
    gu, dn = fake_quantize(gate_up, fmt), fake_quantize(down, fmt)
    g, u = (x @ gu.t()).split(i, dim=-1)
    want = (torch.nn.functional.silu(g) * u) @ dn.t()
    expert = layout.view(buffer)
    for fused in (True, False):
        kernels.set_fused_kernels(fused)
        try:
            got = expert.forward(x)
        finally:
            kernels.set_fused_kernels(True)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (name, tokens, fused)


def test_already_quantised_int4_keeps_its_codes() -> None:
    """GGUF-style blocks (codes 0..15, per-32 scale and offset) are stored without re-rounding the codes."""
    gen = torch.Generator().manual_seed(3)
    h, i = 64, 32
    fmt = ExpertFormat("int4", torch.float32, 32)
    layout = ExpertLayout(fmt, i, h)
    buffer = torch.zeros(layout.numel, dtype=torch.uint8)
    mats = []
    for n, k in ((2 * i, h), (h, i)):
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        d = torch.rand(n, k // 32, generator=gen) + 0.5
        mats.append(Int4Matrix(q, d, -8.0 * d, 32))  # Q4_0: w = d * (q - 8)
    layout.write_matrix(buffer, 0, mats[0])
    layout.write_matrix(buffer, 1, mats[1])
    view = layout.view(buffer)
    for m, v in zip(mats, (view.gate_up, view.down)):
        assert torch.equal(v.layout.unpack(v.packed, v.n, v.k), m.q)
        assert torch.allclose(v.dequantize(), m.dequantize(), atol=1e-6)


def test_int4_matrix_with_wrong_scale_shape_is_refused() -> None:
    with pytest.raises(ConfigError, match="scale and offset"):
        Int4Matrix(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), torch.ones(4, 3), 32)


def test_expert_bytes_per_format_and_the_cost_model_agree() -> None:
    h, i = 2048, 1408
    sizes = {f: expert_nbytes(ExpertFormat(f, torch.bfloat16, 32), i, h) for f in ("bf16", "int8", "int4")}
    assert sizes["bf16"] == 3 * h * i * 2
    for f, nbytes in sizes.items():
        predicted = 3 * h * i * format_bits(f, h, i, 32) / 8
        assert abs(nbytes - predicted) <= 4 * 64, (f, nbytes, predicted)  # section padding only
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"]


def tiny_model_config() -> ModelConfig:
    return ModelConfig.from_dict(tiny_config("mixtral", 256, [0], layers=2, experts=8, hidden=64).to_dict())


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_budget_counts_the_formats_bytes(name: str) -> None:
    config = tiny_model_config()
    fmt = ExpertFormat(name, torch.float32, 32)
    store = ExpertStore(config, torch.float32, fmt=fmt)
    per_expert = store.expert_nbytes
    budget = plan_budget(config, torch.float32, RuntimeOptions(expert_cache_bytes=5 * per_expert + 1), fmt=fmt)
    assert budget.slots == 5 and budget.expert_bytes == per_expert
    assert store.nbytes == 16 * per_expert  # one host copy of each expert, nothing else
    with pytest.raises(BudgetError):
        plan_budget(config, torch.float32, RuntimeOptions(expert_cache_bytes=per_expert - 1), fmt=fmt)


def test_host_memory_check_counts_the_formats_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import hybrimoe.moe.store as store_module

    config = tiny_model_config()
    int4 = ExpertFormat("int4", torch.float32, 32)
    need = 16 * expert_nbytes(int4, config.moe_intermediate_size, config.hidden_size)
    monkeypatch.setattr(store_module, "host_available_bytes", lambda: need)
    ExpertStore(config, torch.float32, fmt=int4)  # fits exactly
    with pytest.raises(BudgetError, match="int8"):
        ExpertStore(config, torch.float32, fmt=ExpertFormat("int8", torch.float32))


def test_store_quantises_gate_and_up_once_both_arrived() -> None:
    config = tiny_model_config()
    fmt = ExpertFormat("int8", torch.float32)
    store = ExpertStore(config, torch.float32, fmt=fmt)
    i, h = config.moe_intermediate_size, config.hidden_size
    gate, up, down = torch.randn(i, h), torch.randn(i, h), torch.randn(h, i)
    store.set_expert(0, 3, gate=gate)
    with pytest.raises(Exception, match="only"):
        store.check_complete()
    store.set_expert(0, 3, up=up, down=down)
    store.check_complete()
    view = store.expert(0, 3)
    assert torch.allclose(view.gate_up.dequantize(), fake_quantize(torch.cat((gate, up)), fmt))
    assert torch.allclose(view.down.dequantize(), fake_quantize(down, fmt))


def test_unknown_format_and_group_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="int3"):
        ExpertFormat("int3")
    with pytest.raises(ConfigError, match="group"):
        ExpertFormat("int4", torch.float32, 48)


def test_the_cli_makes_openmp_threads_wait_passively_unless_told() -> None:
    import os
    import subprocess
    import sys

    code = ("import os, hybrimoe.cli as c; c._set_openmp_defaults(); print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's choice stays
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ACTIVE"


def test_store_takes_already_quantised_matrices_of_a_coarser_group_without_re_rounding() -> None:
    config = tiny_model_config()
    i, h = config.moe_intermediate_size, config.hidden_size  # 32, 64
    store = ExpertStore(config, torch.float32, fmt=ExpertFormat("int4", torch.float32, 32))
    gen = torch.Generator().manual_seed(5)
    gate_up = Int4Matrix(torch.randint(0, 16, (2 * i, h), generator=gen, dtype=torch.uint8),
                         torch.rand(2 * i, 1, generator=gen), -torch.rand(2 * i, 1, generator=gen), 64)
    down = quantize_int4(torch.randn(h, i, generator=gen), 32)
    store.set_expert_quantized(1, 2, gate_up=gate_up, down=down)
    view = store.expert(1, 2)
    codes = view.gate_up.layout.unpack(view.gate_up.packed, 2 * i, h)
    assert torch.equal(codes, gate_up.q)
    assert torch.allclose(view.gate_up.dequantize(), gate_up.dequantize(), atol=1e-6)
    assert torch.allclose(view.down.dequantize(), down.dequantize(), atol=1e-6)
    with pytest.raises(TypeError):
        store.set_expert_quantized(1, 3, gate_up=quantize_int8(torch.randn(2 * i, h)), down=down)


def test_warm_up_calibration_and_profile_costs_use_the_stored_format() -> None:
    from hybrimoe.moe.calibrate import calibrate_costs, profile_costs
    from hybrimoe.moe.devices import Devices
    from hybrimoe.moe.runtime import CpuWorker

    config = tiny_model_config()
    costs = {}
    for name in ("bf16", "int4"):
        store = ExpertStore(config, torch.float32, fmt=ExpertFormat(name, torch.float32, 32))
        store.fill_random(torch.Generator().manual_seed(0), 0.1)
        worker = CpuWorker(threads=1)
        try:
            measured = calibrate_costs(store, Devices.create("cpu"), worker, tokens=8, repeats=2)
        finally:
            worker.close()
        assert measured.copy_seconds > 0 and measured.cpu(1, False) > 0
        costs[name] = profile_costs("paper-a6000", store)
    # the profile prices the bytes the store really copies: int4 with fp32 scale and zero per 32 inputs
    # (4 + 64/32 = 6 bits) against bf16 (16 bits)
    ratio = (costs["bf16"].copy() - 1e-5) / (costs["int4"].copy() - 1e-5)  # minus pcie_latency
    assert abs(ratio - 16 / format_bits("int4", 64, 32, 32, scale_bits=32)) < 0.05, ratio
