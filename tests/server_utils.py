"""Helpers for the server tests: run `hybrimoe serve` / `hybrimoe generate` as real subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0  # import torch + load a tiny model on a busy 2-core machine
READY = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


def subprocess_env() -> dict[str, str]:
    """The test's environment, with this checkout importable and one torch thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServerProcess:
    """A running `hybrimoe serve`; its combined output goes to `log_path`."""

    proc: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def start_server(model_dir: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `python -m hybrimoe serve` on a free loopback port (the OS picks it: --port 0) and
    wait until /health answers; raise with the server's log if it dies or hangs."""
    cmd = [sys.executable, "-m", "hybrimoe", "serve", "--model", str(model_dir), "--dtype", "fp32",
           "--host", "127.0.0.1", "--port", "0", *flags]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**subprocess_env(), **(env or {})}, cwd=REPO_ROOT)
    log.close()
    server = None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            match = READY.search(log_path.read_text(errors="replace"))
            if match:
                server = ServerProcess(proc, f"http://{match.group(1)}:{match.group(2)}", log_path)
                if httpx.get(server.base_url + "/health", timeout=10).status_code == 200:
                    return server
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
    except BaseException:
        proc.kill()
        proc.wait(15)
        raise


def run_generate(model_dir: Path, prompt: str, *flags: str) -> dict:
    """`hybrimoe generate --json` in a subprocess (fp32), as its JSON object."""
    cmd = [sys.executable, "-m", "hybrimoe", "generate", "--model", str(model_dir), "--dtype", "fp32",
           "--prompt", prompt, "--json", *flags]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
