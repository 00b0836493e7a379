"""The int4 columns of benchmarks/RESULTS_formats.md's accuracy tables, measured on the tiny checkpoints.

    .venv/bin/python benchmarks/format_accuracy.py

Per family (hybrimoe.tiny.make_tiny defaults) and test prompt (tests/test_format_parity.PROMPTS), the
prefill logits' error max |logit - ref| / max |ref| of: int4 experts (torch's kernel) against fp32, the
fp32 re-implementation of the same rounding against fp32, the two against each other, int4 experts
with `--cpu-kernel onnxruntime` against torch's kernel (needs onnxruntime), and int4 dense weights
against fp32. Prints one markdown-ish line per family; measured, CPU, fp32 activations.
Then the relative RMS error of one [1024, 4096] weight matrix (Gaussian, and Student-t with 4 degrees
of freedom: heavier tails, closer to real LLM weights), std 0.02, under GGUF Q4_0 (the `gguf` package's
quantiser) and our int4 at groups 32 / 64 / 128: which of our groups matches Q4_0's accuracy.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_format_parity import PROMPTS, fake_quantized_fp32, rel, run  # noqa: E402

from hybrimoe.loader import load_model  # noqa: E402
from hybrimoe.moe.cpu_kernels import apply_cpu_kernel  # noqa: E402
from hybrimoe.moe.ort_kernels import onnxruntime_available  # noqa: E402
from hybrimoe.moe.quant import ExpertFormat  # noqa: E402
from hybrimoe.tiny import FAMILIES, make_tiny  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="format-accuracy-")
    print("family | int4 g32 (engine) | int4 fp32 re-impl. | engine vs re-impl. | onnxruntime vs torch | int4 dense")
    for family in FAMILIES:
        path = make_tiny(family, f"{out}/{family}")
        ref = load_model(path, "fp32", progress=False)
        int4 = load_model(path, "fp32", progress=False, expert_dtype="int4")
        reimpl = fake_quantized_fp32(path, ExpertFormat("int4", torch.float32))
        dense = load_model(path, "fp32", progress=False, dense_dtype="int4")
        ort = None
        if onnxruntime_available():
            ort = load_model(path, "fp32", progress=False, expert_dtype="int4")
            apply_cpu_kernel(ort, "onnxruntime", progress=False)
        cells: list[list[str]] = [[], [], [], [], []]
        for prompt in PROMPTS:
            want = run(ref, prompt, 0)[1]
            got4, got_re = run(int4, prompt, 0)[1], run(reimpl, prompt, 0)[1]
            cells[0].append(f"{rel(got4, want) * 100:.2f}%")
            cells[1].append(f"{rel(got_re, want) * 100:.2f}%")
            cells[2].append(f"{rel(got4, got_re):.1e}")
            cells[3].append(f"{rel(run(ort, prompt, 0)[1], got4) * 100:.2f}%" if ort is not None else "-")
            cells[4].append(f"{rel(run(dense, prompt, 0)[1], want) * 100:.1f}%")
        print(family, "|", " | ".join(" / ".join(c) for c in cells))
    weight_errors()


def weight_errors() -> None:
    import gguf
    from gguf.quants import dequantize, quantize

    from hybrimoe.moe.quant import quantize_int4

    gen = torch.Generator().manual_seed(0)
    samples = {"gaussian": torch.randn(1024, 4096, generator=gen) * 0.02,
               "student-t(4)": torch.distributions.StudentT(4.0).sample((1024, 4096)) * 0.02}
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    for name, w in samples.items():
        def err(approx: torch.Tensor) -> str:
            return f"{float((approx - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()) * 100:.1f}%"
        ref = torch.from_numpy(dequantize(quantize(w.numpy(), q4_0), q4_0)).view_as(w)
        ours = [f"int4 g{g} {err(quantize_int4(w, g).dequantize())}" for g in (32, 64, 128)]
        print(f"weights {name}: Q4_0 {err(ref)},", ", ".join(ours))


if __name__ == "__main__":
    main()
