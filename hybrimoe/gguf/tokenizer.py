"""The tokenizer and chat template stored in a GGUF file, through transformers' GGUF conversion.

transformers builds a fast tokenizer from `tokenizer.ggml.*` (vocabulary, merges, token types,
special ids; `PreTrainedTokenizerFast(gguf_file=...)`). Versions before 5.2x convert only the
architectures their GGUF model loader knows (llama, qwen2moe, qwen3moe, ... not deepseek2 or olmoe).
For those, a byte-level BPE vocabulary (`tokenizer.ggml.model` = "gpt2", what DeepSeek and OLMoE
files hold) is built here from the same metadata with transformers' `GPT2Tokenizer`, as newer
transformers do; any other refused tokenizer falls back to tokenizer files beside the .gguf, or is
a CheckpointError that says so. The chat template comes from `tokenizer.chat_template`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hybrimoe.errors import CheckpointError
from hybrimoe.gguf.files import GGUFModelFiles, open_gguf

log = logging.getLogger(__name__)
CONTROL = 3   # gguf-py TokenType.CONTROL


def byte_level_tokenizer(metadata: dict[str, Any]) -> Any:
    """A GPT2Tokenizer (byte-level BPE, GPT-2 split) from `tokenizer.ggml.tokens/merges/token_type`."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges") or []]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    def token(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    tok = GPT2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=token("unknown"),
                        bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"))
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL]
    if control:
        tok.add_special_tokens({"additional_special_tokens": control})
    return tok


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
        if files.metadata.get("tokenizer.ggml.model") == "gpt2":
            log.info("transformers cannot convert the tokenizer of %s (%s); building its byte-level BPE", first, exc)
            tokenizer = byte_level_tokenizer(files.metadata)
        elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
            log.warning("transformers cannot convert the tokenizer in %s (%s); using %s/tokenizer.json",
                        first, exc, folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            raise CheckpointError(f"transformers cannot build the tokenizer stored in {first} ({exc}); "
                                  "put the original tokenizer files (tokenizer.json, tokenizer_config.json) "
                                  "beside it, or use a newer transformers") from None
    template = files.metadata.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer
