"""CPU decode, hybrimoe int4 experts vs llama.cpp Q4_0, on the same random Mixtral-shaped weights.

    pip install "llama-cpp-python==0.3.36" "gguf==0.19.0"     # builds llama.cpp (~15+ min); not a test dep
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_vs_llamacpp.py --dense-dtype bf16,int8,int4 \
        --gguf-dir /tmp/bench-gguf --out benchmarks/results/vs_llamacpp.json

Weights: seeded normal(0, 0.02) tensors for a Mixtral-shaped model (default hidden 2048, 8 layers,
8 experts of intermediate 4096, top-2: 1.0 GB of int4 experts at group 32). Every expert's float
matrices are drawn once and given to both engines: ours quantises them to int4 (group 32, asymmetric),
the GGUF writer (`gguf` package, llama.cpp's tensor names, arch "llama" with experts) to Q4_0 with the
package's quantiser. Dense weights (attention q/k/v/o and the output projection) at matching precision,
one variant per --dense-dtype entry: ours bf16 / int8 (per-row) / int4 (group 32) against the GGUF's
F16 / Q8_0 / Q4_0 (ours: `--dense-dtype X --lm-head-dtype X`); the token embedding is bf16 / F16 (one
row read per token). q/k rows are not permuted, so the two models do not compute the same function
(random weights: only speed is compared). Both decode the same token ids (a seeded 32-token prompt, then
--new-tokens tokens), CPU only, the same thread count, alternately for --repeats rounds; ms per decode
token and tokens/s, median per engine. Ours runs as `hybrimoe generate` does without runtime flags (the
plain engine: the reference executor on the CPU), in this process; llama.cpp runs in a process of its own
(benchmarks/llama_worker.py) with OMP_WAIT_POLICY unset, as its users run it (--llama-omp-wait-policy to
change it): in one process both engines shared one OMP_WAIT_POLICY, and PASSIVE, which this script's runs
before 2026-11-30 23:30 UTC used, slowed llama.cpp by 1.5x. One JSON row per engine and variant plus a
header row with the machine; never run in CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def model_config(args: argparse.Namespace) -> dict:
    heads = args.hidden // 128
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": args.hidden,
            "intermediate_size": args.expert_intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4), "head_dim": 128,
            "num_local_experts": args.experts, "num_experts_per_tok": 2, "vocab_size": args.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
            "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1}


def expert_tensors(layer: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up [E, I, H] and down [E, H, I] fp32 of one layer (seeded by the layer)."""
    gen = torch.Generator().manual_seed(1000 + layer)
    e, i, h = args.experts, args.expert_intermediate, args.hidden
    return (torch.randn(e, i, h, generator=gen) * 0.02, torch.randn(e, i, h, generator=gen) * 0.02,
            torch.randn(e, h, i, generator=gen) * 0.02)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's sizes and our dense format (shared with profile_decode_cpu.py)."""
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--expert-intermediate", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--int4-group", type=int, default=32,
                        help="our int4 group (32 = Q4_0's; others change the rounding, not the float weights)")
    parser.add_argument("--dense-dtype", default="bf16",
                        help="dense linears and lm_head: bf16 | int8 | int4 | q4_0 (Q4_0's rounding: the GGUF's own "
                             "codes; what --cpu-kernel ggml decodes with), or a comma list (one variant each)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="our model's dtype (`hybrimoe generate --dtype`): activations, norms, KV cache, int4 "
                             "scales of torch's kernel; the GGUFs are written from bf16 weights either way")


GGUF_DENSE = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_0", "q4_0": "Q4_0"}  # ours -> the GGUF's dense type


def build_ours(args: argparse.Namespace, expert_dtype: str = "int4"):
    """Our model, dense weights bf16 (quantise them with `quantize_dense` after writing the GGUF); experts int4
    (asymmetric, --int4-group) or q4_0 (Q4_0's rounding: the GGUF's expert codes and scales, to fp16)."""
    from unittest.mock import patch

    from hybrimoe.config import ModelConfig
    from hybrimoe.loader import build_dummy_model
    from hybrimoe.moe.store import ExpertStore

    config = ModelConfig.from_dict(model_config(args))
    with patch.object(ExpertStore, "fill_random", lambda self, generator, std: None):  # experts come below
        model = build_dummy_model(config, args.dtype, seed=0, std=0.02, expert_dtype=expert_dtype, int4_group=args.int4_group)
    store = model.expert_store
    for layer in config.moe_layers:
        gate, up, down = expert_tensors(layer, args)
        for e in range(args.experts):
            store.set_expert(layer, e, gate=gate[e], up=up[e], down=down[e])
    return model


def write_gguf(model, path: Path, args: argparse.Namespace, dense: str = "bf16") -> None:
    """The GGUF of `model` (bf16 dense weights), dense linears and output in GGUF_DENSE[dense]."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    cfg = model.config
    w.add_context_length(4096)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(args.expert_intermediate)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(128)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(args.experts)
    w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if dense == "int8" else gguf.LlamaFileType.MOSTLY_Q4_0)
    # a minimal SentencePiece-style vocabulary: ids only are fed, but llama.cpp wants one to load
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(args.vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (args.vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * args.vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def f16(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().float().numpy().astype(np.float16))

    def f32(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().float().numpy().astype(np.float32))

    def quant(name: str, t: torch.Tensor, qtype: str) -> None:
        kind = gguf.GGMLQuantizationType[qtype]
        data = gguf.quants.quantize(t.detach().float().numpy(), kind)
        w.add_tensor(name, data, raw_dtype=kind)

    def q4_0(name: str, t: torch.Tensor) -> None:
        quant(name, t, "Q4_0")

    def linear(name: str, t: torch.Tensor) -> None:
        f16(name, t) if dense == "bf16" else quant(name, t, GGUF_DENSE[dense])

    m = model.model
    f16("token_embd.weight", m.embed_tokens.weight)
    f32("output_norm.weight", m.norm.weight)
    linear("output.weight", model.lm_head.weight)
    for i, layer in enumerate(m.layers):
        att = layer.self_attn
        f32(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        f32(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        linear(f"blk.{i}.attn_q.weight", att.q_proj.weight)
        linear(f"blk.{i}.attn_k.weight", att.k_proj.weight)
        linear(f"blk.{i}.attn_v.weight", att.v_proj.weight)
        linear(f"blk.{i}.attn_output.weight", att.o_proj.weight)
        f32(f"blk.{i}.ffn_gate_inp.weight", layer.mlp.gate.weight)
        gate, up, down = expert_tensors(i, args)
        q4_0(f"blk.{i}.ffn_gate_exps.weight", gate)
        q4_0(f"blk.{i}.ffn_up_exps.weight", up)
        q4_0(f"blk.{i}.ffn_down_exps.weight", down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def time_ours(model, prompt: list[int], new: int) -> float:
    """Seconds per decode token (greedy, prompt prefilled first)."""
    kv = model.new_kv_cache(len(prompt) + new + 1)
    with torch.inference_mode():
        logits = model(torch.tensor(prompt), 0, kv)[-1]
        token, pos = int(torch.argmax(logits)), len(prompt)
        start = time.perf_counter()
        for _ in range(new):
            logits = model(torch.tensor([token]), pos, kv)[-1]
            token, pos = int(torch.argmax(logits)), pos + 1
    return (time.perf_counter() - start) / new


def machine_row(args: argparse.Namespace, model, ggufs: dict[str, Path], llama_version: str) -> dict:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    return {"kind": "machine", "cpu": name, "threads": args.threads, "load": os.getloadavg(), "measured": True,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "llama_omp_wait_policy": args.llama_omp_wait_policy or "(default)", "torch": torch.__version__,
            "llama_flash_attn": args.llama_flash_attn,
            "llama_cpp_python": llama_version, "int4_expert_bytes": model.expert_store.nbytes,
            "gguf_bytes": {d: p.stat().st_size for d, p in ggufs.items()}, "config": model_config(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--threads", default="2", help="threads of both engines, or a comma list (variants)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf-dir", type=Path,
                        help="keep the GGUFs here and reuse them (written by an earlier run with the same sizes)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-only", action="store_true", help="write the GGUFs (to --gguf-dir) and stop")
    parser.add_argument("--llama-omp-wait-policy", default=None,
                        help="OMP_WAIT_POLICY of the llama.cpp process (default: unset, llama.cpp's own default; "
                             "ours runs in this process with this process's environment)")
    parser.add_argument("--llama-flash-attn", choices=["off", "on"], default="off",
                        help="llama.cpp's flash attention: off is llama-cpp-python's default (its F16 KV cache read "
                             "by matmuls), on is what llama-cli and llama-server choose on a CPU (their 'auto')")
    parser.add_argument("--cpu-kernel", default="torch",
                        help="our CPU int4 kernel, or a comma list (variants): torch, onnxruntime, onnxruntime-nograph "
                             "(onnxruntime's kernel without the per-layer decode graph of hybrimoe.models.ort_decode), ggml "
                             "(llama.cpp's kernels, experts in q4_0: the GGUF's own codes; dense int4 on onnxruntime); "
                             "onnxruntime's thread pool is sized once: its variants run at the largest --threads only")
    args = parser.parse_args()
    kernels = args.cpu_kernel.split(",")
    denses = args.dense_dtype.split(",")
    if any(d not in GGUF_DENSE for d in denses):
        parser.error(f"--dense-dtype: each of {args.dense_dtype!r} must be one of {', '.join(GGUF_DENSE)}")
    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(thread_counts))
    from hybrimoe.models.quant_linear import quantize_dense

    model = build_ours(args)
    tmp = tempfile.TemporaryDirectory(prefix="bench-llamacpp-")
    where = args.gguf_dir or Path(tmp.name)
    where.mkdir(parents=True, exist_ok=True)
    tag = f"h{args.hidden}-i{args.expert_intermediate}-e{args.experts}-l{args.layers}-v{args.vocab}"
    ggufs = {d: where / f"mixtral-random-{tag}-experts-q4_0-dense-{GGUF_DENSE[d].lower()}.gguf" for d in denses}
    for dense, path in ggufs.items():
        if not path.exists():
            write_gguf(model, path, args, dense)
    if args.write_only:
        print(json.dumps({d: str(p) for d, p in ggufs.items()}))
        return
    from llama_worker import LlamaProcess

    from hybrimoe.moe.cpu_kernels import apply_cpu_kernel

    ours, llamas, stores = {}, {}, {}
    for dense in denses:  # one expert store per kernel, shared by the dense variants; dense weights copied
        fmt = None if dense == "bf16" else dense
        for kernel in kernels:
            base = kernel.removesuffix("-nograph")
            if base not in stores:
                stores[base] = model.expert_store if base == "torch" else \
                    build_ours(args, "q4_0").expert_store if base == "ggml" else copy.deepcopy(model.expert_store)
            ours[dense, kernel] = copy.deepcopy(model, memo={id(model.expert_store): stores[base]})
            quantize_dense(ours[dense, kernel], fmt, fmt, args.int4_group)
            if base != "torch":
                apply_cpu_kernel(ours[dense, kernel], base, progress=False)
            if kernel.endswith("-nograph"):
                ours[dense, kernel].ort_decoder = None  # decode tokens take the torch path around the kernels
        for n in thread_counts:  # llama.cpp in processes of their own (benchmarks/llama_worker.py: why)
            context = -(-(args.prompt_tokens + args.new_tokens + 1) // 256) * 256
            llamas[dense, n] = LlamaProcess(ggufs[dense], n, args.llama_omp_wait_policy, context,
                                            args.llama_flash_attn == "on")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(259, args.vocab, (args.prompt_tokens,), generator=gen).tolist()
    variants = [(d, k, n) for d in denses for k in ["llama.cpp", *kernels] for n in thread_counts
                if k in ("llama.cpp", "torch") or n == max(thread_counts)]
    load_before = os.getloadavg()
    times: dict[tuple[str, str, int], list[float]] = {}

    def timed(dense: str, impl: str, n: int, new: int) -> float:
        # torch at one thread beside onnxruntime's pool of n, as `hybrimoe generate` runs it (ort_kernels.
        # leave_cores_to_onnxruntime); runs before 2026-12-01 00:20 UTC had torch at n threads there too
        torch.set_num_threads(1 if impl != "torch" else n)
        if impl == "llama.cpp":
            return llamas[dense, n].seconds_per_token(prompt, new)
        return time_ours(ours[dense, impl], prompt, new)

    for dense, impl, n in variants:  # warm-up
        timed(dense, impl, n, 4)
    for _ in range(args.repeats):  # interleaved: every variant of both engines in each round
        for dense, impl, n in variants:
            times.setdefault((impl, dense, n), []).append(timed(dense, impl, n, args.new_tokens))
    for llama in llamas.values():
        llama.close()
    rows = [machine_row(args, model, ggufs, next(iter(llamas.values())).version)]
    for (impl, dense, n), runs in times.items():
        s = statistics.median(runs)
        label = f"llama.cpp Q4_0 experts, {GGUF_DENSE[dense]} dense" if impl == "llama.cpp" else \
            f"hybrimoe {'q4_0' if impl == 'ggml' else f'int4 g{args.int4_group}'} experts, {dense} dense, {impl} CPU kernel"
        rows.append({"kind": "decode", "impl": "llama.cpp" if impl == "llama.cpp" else "hybrimoe",
                     "cpu_kernel": None if impl == "llama.cpp" else impl, "label": label, "dense": dense,
                     "threads": n, "torch_threads": 1 if impl != "torch" else n,
                     "gguf_dense": GGUF_DENSE[dense], "ms_per_token": round(s * 1e3, 2),
                     "tokens_per_second": round(1 / s, 2), "runs_ms": [round(t * 1e3, 2) for t in runs],
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "measured": True})
    for dense, impl, n in variants:
        if impl == "llama.cpp":
            continue
        a, b = times[(impl, dense, n)], times[("llama.cpp", dense, n)]
        rows.append({"kind": "ratio", "dense": dense, "threads": n, "cpu_kernel": impl,
                     "ours_tokens_per_second_over_llamacpp": round(statistics.median(b) / statistics.median(a), 3),
                     "per_round": [round(y / x, 3) for x, y in zip(a, b)], "measured": True})
    rows[0]["load_before"] = load_before  # "load" is taken after the runs
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
