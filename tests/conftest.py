"""Shared fixtures: tiny random checkpoints of every family, made once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from hybrimoe.tiny import make_tiny


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (restored after it): an OpenMP team of 2 on a loaded 2-core box
    stalls the runtime's worker thread and the main thread against each other. Use it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint(family, layout="per-expert", **options) -> Path` of a tiny random checkpoint.

    family: mixtral, qwen2-moe, qwen3-moe, olmoe, deepseek-v2, deepseek-v2-lite, deepseek-v3.
    options: further `hybrimoe.tiny.make_tiny` keywords (e.g. max_shard_size, overrides={...}).
    Each distinct request is written once per session; treat the directory as read-only.
    """
    made: dict[str, Path] = {}

    def make(family: str, layout: str = "per-expert", **options: Any) -> Path:
        key = json.dumps([family, layout, options], sort_keys=True, default=str)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{layout}")
            make_tiny(family, out, layout=layout, **options)
            made[key] = out
        return made[key]

    return make
