"""Finding and opening GGUF files: one file, a directory holding one, or split parts.

Split files are named as llama.cpp's `gguf-split` and gguf-py's `GGUFWriter(split_max_*)` name them
(`SHARD_NAME_FORMAT` in gguf-py/gguf/constants.py): `NAME-00001-of-00003.gguf`, with `split.no`,
`split.count` and `split.tensors.count` in every part; the model's metadata (architecture,
hyperparameters, tokenizer) is in the first part only. Any part may be given: all are opened.
Everything unreadable is a CheckpointError naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybrimoe.errors import CheckpointError

SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def is_gguf_path(path: str | os.PathLike) -> bool:
    """True for a `.gguf` file, or a directory with a `.gguf` file and no Hugging Face config.json."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path.endswith(".gguf")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return any(n.endswith(".gguf") for n in os.listdir(path))
    return False


def gguf_model_name(path: str | os.PathLike) -> str:
    """The model's name: the .gguf file name without `.gguf` and the split suffix (a directory: its name)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.basename(os.path.abspath(path))
    base = os.path.basename(path)
    m = SPLIT_NAME.fullmatch(base)
    return m.group("stem") if m else base.removesuffix(".gguf")


def gguf_parts(path: str | os.PathLike) -> list[str]:
    """The file(s) of the GGUF model at `path` (a file, any split part, or a directory), in split order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        models = sorted({m.group("stem") if (m := SPLIT_NAME.fullmatch(n)) else n for n in files})
        if not models:
            raise CheckpointError(f"no .gguf file in {path}")
        if len(models) > 1:
            raise CheckpointError(f"{path} holds several GGUF models ({', '.join(models)}); "
                                  "give --model the file to load")
        first = next(n for n in files if n == models[0] or n.startswith(models[0] + "-"))
        return gguf_parts(os.path.join(path, first))
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    m = SPLIT_NAME.fullmatch(os.path.basename(path))
    if not m:
        return [path]
    count = int(m.group("count"))
    folder = os.path.dirname(path)
    parts = [os.path.join(folder, f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [os.path.basename(p) for p in parts if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"split GGUF model {m.group('stem')!r} has {count} parts; missing: {', '.join(missing)}")
    return parts


@dataclass
class GGUFModelFiles:
    """The opened parts of one GGUF model. `metadata` = the first part's key-value pairs (split.* dropped)."""

    paths: list[str]
    readers: list[Any]                  # gguf.GGUFReader per part
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        """The model's file name without `.gguf` (and without the split suffix)."""
        return gguf_model_name(self.paths[0])

    def tensors(self) -> list[tuple[str, Any, str]]:
        """(name, gguf.ReaderTensor, file) of every tensor in every part."""
        return [(t.name, t, path) for path, r in zip(self.paths, self.readers) for t in r.tensors]


def _open(path: str) -> Any:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        for t in reader.tensors:      # the reader maps lazily: a short file shows as a short last tensor
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name!r} needs {t.n_bytes} bytes, the file holds {t.data.nbytes}")
        return reader
    except (ValueError, KeyError, IndexError, OSError, TypeError) as exc:
        raise CheckpointError(f"corrupt or truncated GGUF file {path}: {exc}") from None


def field_value(field: Any) -> Any:
    """A metadata field as a Python value (int, float, bool, str, or a list of them)."""
    from gguf import GGUFValueType

    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.BOOL:
        return bool(value)
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        # the shortest decimal that rounds to this float32: 1e-5 stays 1e-5, not 9.99999974e-06
        return float(str(np.float32(value)))
    return value


def open_gguf(path: str | os.PathLike) -> GGUFModelFiles:
    """Opens every part of the GGUF model at `path`; checks the split bookkeeping."""
    paths = gguf_parts(path)
    readers = [_open(p) for p in paths]
    first = readers[0]
    metadata = {name: field_value(f) for name, f in first.fields.items()
                if not name.startswith("GGUF.") and not name.startswith("split.")}
    if len(paths) > 1:
        for i, (p, r) in enumerate(zip(paths, readers)):
            no = r.fields.get("split.no")
            if no is None or field_value(no) != i:
                raise CheckpointError(f"{p} is not part {i + 1} of {len(paths)} (its split.no is "
                                      f"{None if no is None else field_value(no)})")
        want = first.fields.get("split.tensors.count")
        have = sum(len(r.tensors) for r in readers)
        if want is not None and field_value(want) != have:
            raise CheckpointError(f"split GGUF model {paths[0]}: the parts hold {have} tensors, "
                                  f"split.tensors.count says {field_value(want)}")
    if "general.architecture" not in metadata:
        raise CheckpointError(f"{paths[0]} has no general.architecture (is it the first split part?)")
    return GGUFModelFiles(paths, readers, metadata)
