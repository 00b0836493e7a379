"""GGUF checkpoints (llama.cpp's format): files, metadata -> ModelConfig, tensors, tokenizer.

See docs/GGUF.md. Submodules import `gguf` (and torch, for tensors) lazily so that `hybrimoe.config`
can ask `is_gguf_path` without importing torch.
"""

from hybrimoe.gguf.files import is_gguf_path

__all__ = ["is_gguf_path"]
