"""What every benchmark records about the machine, and starting a `hybrimoe serve` to measure.

Benchmarks run as scripts (`.venv/bin/python benchmarks/NAME.py`), so this folder is on sys.path and
they import this module as `machine`.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else what platform knows)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def print_and_write(text: str, out: str | None) -> None:
    """Prints a benchmark's result and, with --out, writes it there too (one trailing newline)."""
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def start_server(model: Path, log: Path, options: list[str], env: dict[str, str] | None = None,
                 timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`hybrimoe serve --model MODEL --dtype fp32` on a free local port with `options`, its output in `log`;
    returns (process, base URL) once /health answers 200, or raises RuntimeError (the log's tail if the
    server exited)."""
    import httpx  # a test dependency; only the server benchmarks need it

    cmd = [sys.executable, "-m", "hybrimoe", "serve", "--model", str(model), "--dtype", "fp32", "--host", "127.0.0.1",
           "--port", "0", *options]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        match = READY.search(log.read_text())
        if match:
            url = f"http://127.0.0.1:{match.group(1)}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")
