"""Every module of the package imports on its own, first (no import cycles hidden by import order)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import hybrimoe

SCRIPT = """
import importlib, sys
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "hybrimoe" or m.startswith("hybrimoe.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every failing module, not just the first
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_first_in_a_fresh_package() -> None:
    names = [m.name for m in pkgutil.walk_packages(hybrimoe.__path__, "hybrimoe.") if m.name != "hybrimoe.__main__"]
    assert len(names) > 40
    done = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_module_listing_sees_the_subpackages() -> None:
    importlib.import_module("hybrimoe.policy.schedule")
    found = {m.name for m in pkgutil.walk_packages(hybrimoe.__path__, "hybrimoe.")}
    assert {"hybrimoe.moe.layer", "hybrimoe.models.transformer", "hybrimoe.server.app"} <= found
