"""What `hybrimoe plan --model` names: a shipped shape, a config.json, or a checkpoint directory.

    resolve_target("mixtral-8x7b" | "path/config.json" | "path/DIR") -> Target
The config is read once here: `ModelShape` (sizes the simulator and cost model need) and, when
hybrimoe's runtime can load the family, `ModelConfig` (what the runtime's own memory accounting
takes). A family the runtime cannot load (e.g. Qwen3.6's qwen3_5_moe) still gets a plan, with
memory estimated from the shape and no `serve` command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrimoe.config import ModelConfig
from hybrimoe.errors import ConfigError
from hybrimoe.jsonfile import read_json_object
from hybrimoe.policy.shape import SHAPES_DIR, ModelShape, known_shapes


@dataclass(frozen=True)
class Target:
    name: str  # shape name or directory name
    shape: ModelShape
    config: ModelConfig | None  # None: the runtime cannot load this family
    unsupported: str  # why config is None ("" when it is not)
    model_arg: str  # the `--model` of the recommended command
    checkpoint: bool  # model_arg is a directory the user already has (else: where to download it)
    tied_embeddings: bool  # lm_head shares the embedding matrix (for the shape-only estimate)


def _is_gguf(path: str) -> bool:
    from hybrimoe.gguf.files import is_gguf_path

    return is_gguf_path(path)


def resolve_target(text: str) -> Target:
    """The model `text` names; ConfigError naming what was expected when it names nothing usable."""
    shipped = SHAPES_DIR / f"{text}.json"
    if shipped.is_file():
        path, name, model_arg, checkpoint = shipped, text, f"./{text}", False
    elif os.path.isfile(text) and text.endswith(".json"):
        path = Path(text)
        name = path.parent.resolve().name or path.stem
        model_arg, checkpoint = str(path.parent) or ".", (path.parent / "config.json") == path
    elif os.path.isdir(text) and os.path.isfile(os.path.join(text, "config.json")):
        path, name, model_arg, checkpoint = Path(text) / "config.json", Path(text).resolve().name, text, True
    elif os.path.exists(text) and _is_gguf(text):
        raise ConfigError(f"{text} is a GGUF file: `hybrimoe plan` reads a config.json; give the model's shape "
                          f"name ({', '.join(known_shapes())}) or its Hugging Face config.json")
    elif os.path.exists(text):
        raise ConfigError(f"{text} is neither a config.json nor a directory holding one")
    else:
        raise ConfigError(f"--model {text!r}: no such file or directory, and not a shipped shape "
                          f"({', '.join(known_shapes())})")
    d: dict[str, Any] = read_json_object(path, "model config")
    shape = ModelShape.from_hf_config(d, name)
    try:
        config, unsupported = ModelConfig.from_dict(d), ""
    except ConfigError as exc:
        config, unsupported = None, str(exc)
    text_cfg = d.get("text_config") if isinstance(d.get("text_config"), dict) else d
    return Target(name, shape, config, unsupported, model_arg, checkpoint,
                  bool(text_cfg.get("tie_word_embeddings", d.get("tie_word_embeddings", False))))
