"""The tokenizer and chat template stored in a GGUF file, through transformers' GGUF conversion.

transformers builds a fast tokenizer from `tokenizer.ggml.*` (vocabulary, merges, token types,
special ids; `PreTrainedTokenizerFast(gguf_file=...)`). Versions before 5.2x convert only the
architectures their GGUF model loader knows (llama, qwen2moe, qwen3moe, ... but not deepseek2 or
olmoe); there, tokenizer files (tokenizer.json) beside the .gguf are used instead, and without them
the error says so. The chat template comes from `tokenizer.chat_template`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hybrimoe.errors import CheckpointError
from hybrimoe.gguf.files import GGUFModelFiles, open_gguf

log = logging.getLogger(__name__)


def load_gguf_tokenizer(path: str | os.PathLike, files: GGUFModelFiles | None = None) -> Any:
    """A transformers tokenizer for the GGUF model at `path` (file, split part or directory)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = files or open_gguf(path)
    first = files.paths[0]
    folder = os.path.dirname(os.path.abspath(first))
    if "tokenizer.ggml.tokens" not in files.metadata:
        raise CheckpointError(f"{first} has no tokenizer (no tokenizer.ggml.tokens metadata)")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=os.path.basename(first))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise CheckpointError(f"transformers cannot build the tokenizer stored in {first} ({exc}); "
                                  "put the original tokenizer files (tokenizer.json, tokenizer_config.json) "
                                  "beside it, or use a newer transformers") from None
        log.warning("transformers cannot convert the tokenizer in %s (%s); using %s/tokenizer.json",
                    first, exc, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    template = files.metadata.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer
