"""Calibration end to end on synthetic timing samples of known rates, per expert format.

Samples are generated from a known CPU read bandwidth, FLOP rate, per-expert overhead and first-expert
penalty, a known GPU bandwidth / FLOP rate / kernel overhead and a known copy link, for the byte count
of each format's expert; `fit_profile` (the fitting half of `hybrimoe calibrate`) must give them back.
The GPU's FLOP rate is chosen so that the largest token counts are compute-bound: with one expert size
and only memory-bound samples, bandwidth and per-kernel overhead cannot be told apart (the CPU side
measures a second, half-width expert for that; the GPU side does not yet).
"""

from __future__ import annotations

import pytest

from hybrimoe.calibrate import CalibrationSettings, fit_profile
from hybrimoe.policy.cost import CostModel

TRUE = dict(cpu_bw=20e9, cpu_flops=2e11, cpu_overhead=30e-6, penalty=1.3,
            gpu_bw=800e9, gpu_flops=5e12, gpu_overhead=20e-6, pcie_bw=25e9, pcie_latency=10e-6)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)


def synthetic_samples(s: CalibrationSettings) -> tuple[dict, dict]:
    shape, small = s.expert_shape(), s.expert_shape(s.intermediate // 2)

    def cpu_t(sh, n: int) -> float:
        return max(sh.bytes / TRUE["cpu_bw"], sh.flops(n) / TRUE["cpu_flops"]) + TRUE["cpu_overhead"]

    later = [cpu_t(shape, n) for n in TOKENS]
    cpu = {"tokens": list(TOKENS), "later": later, "first": [TRUE["penalty"] * t for t in later],
           "small_intermediate": [s.intermediate // 2], "small_bytes": [small.bytes], "small_t1": [cpu_t(small, 1)]}
    gpu_t = [max(shape.bytes / TRUE["gpu_bw"], shape.flops(n) / TRUE["gpu_flops"]) + TRUE["gpu_overhead"] for n in TOKENS]
    sizes = [shape.bytes / f for f in (8, 4, 2, 1)]
    gpu = {"tokens": list(TOKENS), "expert": gpu_t, "copy_bytes": sizes,
           "copy": [TRUE["pcie_latency"] + b / TRUE["pcie_bw"] for b in sizes],
           "dense_tokens": [1024], "dense_flops": [70e12], "layer_overhead": [75e-6]}
    return cpu, gpu


@pytest.mark.parametrize("expert_dtype,bits", [("bf16", 16.0), ("int8", 8.0), ("int4", 4.0)])
def test_fit_gives_back_the_rates_that_made_the_samples(expert_dtype: str, bits: float) -> None:
    s = CalibrationSettings(hidden=2048, intermediate=1408, dtype="bf16", token_counts=TOKENS, expert_dtype=expert_dtype)
    cpu, gpu = synthetic_samples(s)
    profile = fit_profile(s, cpu, gpu, "synthetic", "synthetic samples")
    assert bits <= profile.cpu_bits < bits + 1.1 and profile.gpu_bits == profile.cpu_bits  # scales included
    assert profile.dense_bits == 16.0

    def close(value: float, want: float, tol: float = 0.02) -> None:
        assert abs(value - want) <= tol * want, (expert_dtype, value, want)

    close(profile.cpu_stream_bandwidth, TRUE["cpu_bw"])
    close(profile.cpu_flops, TRUE["cpu_flops"])
    close(profile.cpu_expert_overhead, TRUE["cpu_overhead"])
    close(profile.cpu_first_expert_penalty, TRUE["penalty"])
    close(profile.gpu_hbm_bandwidth, TRUE["gpu_bw"])
    close(profile.gpu_flops, TRUE["gpu_flops"])
    close(profile.gpu_kernel_overhead, TRUE["gpu_overhead"])
    close(profile.pcie_bandwidth, TRUE["pcie_bw"])
    close(profile.pcie_latency, TRUE["pcie_latency"])
    # the profile prices the format's expert as the samples did, through the cost model's own formulas
    shape = s.expert_shape()
    for i, n in enumerate(TOKENS):
        close(profile.cpu_expert_time(shape, n), cpu["later"][i])
        close(profile.gpu_expert_time(shape, n), gpu["expert"][i])
    close(profile.copy_time(shape), gpu["copy"][-1])
    round_trip = CostModel.from_dict(profile.to_dict())
    assert round_trip == profile and round_trip.extra["expert_format"] == s.expert_format().describe()


def test_int4_expert_copies_and_cpu_reads_fewer_bytes_than_bf16() -> None:
    """Same rates, other format: the fitted profile predicts the int4 expert's copy ~4x faster."""
    times = {}
    for expert_dtype in ("bf16", "int4"):
        s = CalibrationSettings(hidden=2048, intermediate=1408, token_counts=TOKENS, expert_dtype=expert_dtype)
        profile = fit_profile(s, *synthetic_samples(s), "synthetic", "synthetic samples")
        times[expert_dtype] = profile.copy_time(s.expert_shape()) - profile.pcie_latency
    assert 3.0 < times["bf16"] / times["int4"] < 4.0
