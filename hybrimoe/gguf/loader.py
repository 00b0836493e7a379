"""GGUF file(s) -> `MoETransformer`: metadata -> ModelConfig, tensors dequantised -> the usual loader.

Every GGUF tensor is dequantised to float32 (`hybrimoe.gguf.tensors`), renamed to our Hugging Face
parameter name and handed to the safetensors loader's `_Loader.take`, so the same shape checks apply
and routed experts land in the `ExpertStore` in whatever expert format the store keeps. Stacked expert
tensors are dequantised one expert at a time (peak extra memory: one expert matrix in fp32).
"""

from __future__ import annotations

import logging
import os

import torch
from tqdm import tqdm

from hybrimoe.errors import CheckpointError
from hybrimoe.gguf.files import open_gguf
from hybrimoe.gguf.metadata import model_config
from hybrimoe.gguf.quantized import dense_int4_matrices
from hybrimoe.gguf.tensors import TensorMapper, expected_names
from hybrimoe.loader import _Loader, build_empty_model
from hybrimoe.models.quant_linear import quantize_dense
from hybrimoe.models.transformer import MoETransformer

log = logging.getLogger(__name__)


def load_gguf_model(path: str | os.PathLike, dtype: str | torch.dtype = "fp32",
                    device: str | torch.device = "cpu", progress: bool = True,
                    pin_memory: bool = False, expert_dtype: str | None = None,
                    int4_group: int | None = None, dense_dtype: str | None = None,
                    lm_head_dtype: str | None = None) -> MoETransformer:
    """Loads a GGUF model (a file, any part of a split model, or a directory holding one); routed experts
    are dequantised exactly, then stored in `expert_dtype` (None = `dtype`; see hybrimoe.moe.quant);
    dense linears in `dense_dtype`, lm_head in `lm_head_dtype` (hybrimoe.models.quant_linear)."""
    files = open_gguf(path)
    tensors = files.tensors()
    names = {name for name, _, _ in tensors}
    config = model_config(files)
    missing = [n for n in expected_names(config, names) if n not in names]
    if missing:
        raise CheckpointError(f"missing tensor(s) in {files.paths[0]}: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model = build_empty_model(config, dtype, pin_memory, expert_dtype, int4_group)
    loader = _Loader(model)
    mapper = TensorMapper(config)
    with tqdm(total=len(tensors), desc=f"loading {files.name}", unit="tensor",
              disable=not progress or None) as bar:
        for name, tensor, file in tensors:
            for our_name, value in mapper.map(name, tensor):
                loader.take(our_name, value, file)
            bar.update(1)
    loader.finish(files.paths[0])
    log.info("loaded GGUF %s (%s): %d layers, %d MoE layers x %d experts, experts %.1f MB in host memory",
             files.name, config.model_type, config.num_layers, len(config.moe_layers), config.num_experts,
             model.expert_store.nbytes / 1e6)
    matrices = dense_int4_matrices(tensors, config) if {"int4", "q4_0"} & {dense_dtype, lm_head_dtype} else None
    quantize_dense(model, dense_dtype, lm_head_dtype, int4_group, matrices)  # Q4_0 codes kept as they are
    if torch.device(device).type != "cpu":
        model.to(device)
    return model
