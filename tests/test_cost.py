"""CostModel formulas, shipped profiles and their derivations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cost import GRAPH_PARAMETERS, PARAMETERS, CostModel, ExpertShape, known_profiles
from hybrimoe.policy.shape import ModelShape


def test_expert_shape_units() -> None:
    s = ExpertShape(hidden=4096, intermediate=14336, bits=4.5)
    assert s.bytes == pytest.approx(3 * 4096 * 14336 * 4.5 / 8)  # B
    assert s.flops(1) == 2 * 3 * 4096 * 14336  # FLOP per token
    assert s.flops(10) == 10 * s.flops(1)


def test_formulas_by_hand() -> None:
    cost = CostModel.load("paper-a6000")
    s = ExpertShape(1024, 512, 8.0)  # 1.5 MiB of weights, 3.1 MFLOP per token
    mem = s.bytes / cost.cpu_stream_bandwidth
    assert cost.cpu_expert_time(s, 1, False) == pytest.approx(mem + cost.cpu_expert_overhead)
    compute = s.flops(100_000) / cost.cpu_flops
    assert cost.cpu_expert_time(s, 100_000, False) == pytest.approx(compute + cost.cpu_expert_overhead)
    assert cost.gpu_expert_time(s, 1) == pytest.approx(s.bytes / cost.gpu_hbm_bandwidth + cost.gpu_kernel_overhead)
    assert cost.copy_time(s) == pytest.approx(s.bytes / cost.pcie_bandwidth + cost.pcie_latency)
    assert cost.cpu_expert_time(s, 0, True) == 0.0 and cost.gpu_expert_time(s, 0) == 0.0


@pytest.mark.parametrize("profile", ["paper-a6000", "desktop-4090"])
@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen2-57b-a14b", "deepseek-v2-lite"])
def test_monotone_penalty_and_copy(profile: str, model: str) -> None:
    cost, shape = CostModel.load(profile), ModelShape.named(model)
    table = cost.expert_costs(shape)
    counts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
    cpu = [table.cpu(n, False) for n in counts]
    gpu = [table.gpu(n) for n in counts]
    assert all(a <= b for a, b in zip(cpu, cpu[1:])) and cpu[-1] > cpu[0]
    assert all(a <= b for a, b in zip(gpu, gpu[1:])) and gpu[-1] > gpu[0]
    assert all(table.cpu(n, True) == pytest.approx(cost.cpu_first_expert_penalty * table.cpu(n, False)) for n in counts)
    assert cost.cpu_first_expert_penalty > 1
    assert table.copy() == cost.copy_time(cost.gpu_expert_shape(shape))  # no token argument at all
    # the hybrid trade-off exists: a cached expert on the GPU beats the CPU, a copy costs more than 1 CPU token
    assert table.gpu(1) < table.cpu(1, False) < table.copy() + table.gpu(1)
    assert table.cpu(1024, False) > table.copy() + table.gpu(1024)  # heavy prefill experts are worth a copy
    layer = shape.moe_layers[0]
    assert cost.gpu_dense_time(shape, layer, 1, 4096) > cost.gpu_dense_time(shape, layer, 1, 16)
    assert cost.gpu_dense_time(shape, layer, 512, 0) > cost.gpu_dense_time(shape, layer, 1, 0) > cost.gpu_layer_overhead
    assert cost.lm_head_time(shape, 8) >= cost.lm_head_time(shape, 1) > 0


def test_profiles_have_every_number_derived() -> None:
    assert {"paper-a6000", "desktop-4090"} <= set(known_profiles())
    readme = (Path(__file__).resolve().parents[1] / "hybrimoe" / "profiles" / "README.md").read_text()
    for name in ("paper-a6000", "desktop-4090"):
        cost = CostModel.load(name)
        assert set(cost.derivations) == set(PARAMETERS) | set(GRAPH_PARAMETERS)
        for param, text in cost.derivations.items():
            assert len(text) > 20, (name, param)
            assert text in readme, (name, param)  # README states the same derivation


def test_load_errors_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shipped: .*paper-a6000"):
        CostModel.load("tpu-v9")
    with pytest.raises(ConfigError, match="not found"):
        CostModel.load(str(tmp_path / "nope.json"))
    d = CostModel.load("desktop-4090").to_dict()
    del d["params"]["pcie_latency"]
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="missing parameters \\['pcie_latency'\\]"):
        CostModel.load(str(tmp_path / "p.json"))
    d = CostModel.load("desktop-4090").to_dict()
    d["params"]["cpu_first_expert_penalty"]["value"] = 0.5
    (tmp_path / "q.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="penalty"):
        CostModel.load(str(tmp_path / "q.json"))
    original = CostModel.load("paper-a6000")
    original.save(tmp_path / "r.json")
    again = CostModel.load(str(tmp_path / "r.json"))
    assert again == original and again.derivations == original.derivations


def test_fits_recover_known_parameters() -> None:
    from hybrimoe.policy.fit import fit_affine, fit_penalty, fit_roofline

    tokens = [1, 2, 4, 8, 16, 32, 64, 128]
    truth = [max(2e-3, 5e-5 * n) + 1e-4 for n in tokens]  # knee at 40 tokens
    fit = fit_roofline(tokens, truth)
    assert (fit.flat, fit.slope, fit.intercept) == pytest.approx((2e-3, 5e-5, 1e-4), rel=1e-6)
    flat_only = fit_roofline([1, 2, 4], [3e-3, 3e-3, 3e-3])
    assert flat_only.predict(4) == pytest.approx(3e-3) and "lower bound" in flat_only.note
    assert fit_affine([1e6, 2e6, 4e6], [1e-5 + b / 2e10 for b in (1e6, 2e6, 4e6)]) == pytest.approx((1e-5, 5e-11))
    assert fit_penalty([1.0, 2.0], [1.5, 3.0]) == pytest.approx(1.5)
    assert fit_penalty([1.0, 2.0], [0.9, 1.8]) == 1.0  # never below 1


def test_calibrate_cli_writes_loadable_profile(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from hybrimoe.cli import main

    out = tmp_path / "here.json"
    assert main(["calibrate", "--hidden", "32", "--intermediate", "64", "--tokens", "1,4,16", "--layers", "2",
                 "--experts-per-layer", "2", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    cost = CostModel.load(str(out))
    assert cost.name == "here" and cost.cpu_bits == 16.0 and cost.cpu_first_expert_penalty >= 1.0
    assert all(d.startswith("measured on") or d.startswith("bf16") for d in cost.derivations.values())
    assert "measured on cpu" in cost.derivations["gpu_hbm_bandwidth"]  # no CUDA in this test
    assert cost.extra["samples"]["cpu"]["tokens"] == [1, 4, 16]
    shape = ExpertShape(32, 64, cost.cpu_bits)
    assert cost.cpu_expert_time(shape, 16) >= cost.cpu_expert_time(shape, 1) > 0
    assert main(["calibrate", "--out", str(tmp_path / "x.json")]) == 2  # no expert named
    assert main(["calibrate", "--model-shape", "nope", "--out", str(tmp_path / "x.json")]) == 2


def test_two_size_roofline_recovers_bandwidth_overhead_and_flops() -> None:
    """Synthetic CPU: 50 GB/s, 1 TFLOP/s, 200 us per expert. One expert size alone cannot split
    bandwidth from overhead; a second size can, and the fit recovers all three."""
    from hybrimoe.policy.fit import fit_roofline_two_sizes

    bw, flops_rate, overhead = 50e9, 1e12, 200e-6
    big, small = ExpertShape(2048, 1408, 16), ExpertShape(2048, 704, 16)

    def t(shape: ExpertShape, n: int) -> float:
        return max(shape.bytes / bw, shape.flops(n) / flops_rate) + overhead

    tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    fit = fit_roofline_two_sizes(tokens, [t(big, n) for n in tokens], big.flops(1), big.bytes, small.bytes, t(small, 1))
    assert fit is not None
    assert big.bytes / fit.flat == pytest.approx(bw, rel=1e-6)
    assert fit.intercept == pytest.approx(overhead, rel=1e-6)
    assert big.flops(1) / fit.slope == pytest.approx(flops_rate, rel=1e-6)
    assert fit_roofline_two_sizes(tokens, [t(big, n) for n in tokens], big.flops(1), big.bytes, small.bytes,
                                  t(big, 1)) is None  # the smaller expert is not faster: no split
