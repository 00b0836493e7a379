"""llama.cpp in a process of its own, for benchmarks/bench_vs_llamacpp.py.

    python benchmarks/llama_worker.py MODEL.gguf THREADS [CONTEXT [FLASH_ATTN]]

Why a process of its own: llama.cpp and torch each bring an OpenMP runtime, and OMP_WAIT_POLICY is read
once per process. In one process, llama.cpp ran 1.5x slower under the PASSIVE policy that suits our
engine (16-17 against 11 ms per token on a 2-vCPU AMD EPYC), and either engine's spinning threads took
cores from the other. Here llama.cpp gets the environment its users give it (the bench passes its own,
minus OMP_WAIT_POLICY unless --llama-omp-wait-policy says otherwise), loads the model once, and answers
one JSON line per request on stdin, {"prompt": [ids], "new": N}, with {"seconds_per_token": s}: the
prompt evaluated first, then N greedy decode tokens timed. The first line it prints is
{"ready": true, "llama_cpp_python": version}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def time_llama(llm, prompt: list[int], new: int) -> float:
    """Seconds per decode token (greedy, prompt evaluated first)."""
    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return (time.perf_counter() - start) / new


class LlamaProcess:
    """The parent's handle on a worker: `seconds_per_token(prompt, new)`, `close()`."""

    def __init__(self, gguf: Path, threads: int, omp_wait_policy: str | None, context: int = 256,
                 flash_attn: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        argv = [sys.executable, __file__, str(gguf), str(threads), str(context), str(int(flash_attn))]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.version = self._answer()["llama_cpp_python"]

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited with {self.proc.wait()}")
        return json.loads(line)

    def seconds_per_token(self, prompt: list[int], new: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new": new}) + "\n")
        self.proc.stdin.flush()
        return float(self._answer()["seconds_per_token"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    import llama_cpp

    path, threads = sys.argv[1], int(sys.argv[2])
    context = int(sys.argv[3]) if len(sys.argv) > 3 else 256  # tokens (llama.cpp's KV cache)
    flash_attn = len(sys.argv) > 4 and sys.argv[4] == "1"  # llama-cpp-python's default: off (llama-cli: auto)
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context, n_batch=64,
                          n_gpu_layers=0, logits_all=True, verbose=False, flash_attn=flash_attn)
    print(json.dumps({"ready": True, "llama_cpp_python": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps({"seconds_per_token": time_llama(llm, request["prompt"], request["new"])}), flush=True)


if __name__ == "__main__":
    main()
