"""Hugging Face checkpoint directory -> `MoETransformer` on the CPU.

Reads config.json and the safetensors file(s) (one file, or the shards named by
model.safetensors.index.json), one shard and one tensor at a time. Dense tensors are copied into the
parameter of the same name (module names mirror the checkpoint); routed experts are copied straight
into their `ExpertStore` slice, from either on-disk layout:
  per-expert  `model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`
              (Mixtral: `model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`)
  fused       `model.layers.L.mlp.experts.gate_up_proj` [E, 2I, H], `...experts.down_proj` [E, H, I]
Anything missing, unexpected, misshaped or unreadable is a CheckpointError naming the tensor and file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from hybrimoe.config import ModelConfig
from hybrimoe.errors import CheckpointError, ConfigError
from hybrimoe.gguf.files import is_gguf_path
from hybrimoe.models.quant_linear import quantize_dense
from hybrimoe.models.transformer import MoETransformer
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.moe.store import ExpertStore

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextlib.contextmanager
def _fast_init(dtype: torch.dtype) -> Iterator[None]:
    """Builds modules without random init (weights come from the checkpoint) in `dtype`."""
    saved = (nn.Linear.reset_parameters, nn.Embedding.reset_parameters, torch.get_default_dtype())
    nn.Linear.reset_parameters = lambda self: None   # type: ignore[method-assign]
    nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved[0], saved[1]
        torch.set_default_dtype(saved[2])


def expert_format(dtype: str | torch.dtype, expert_dtype: str | None = None,
                  int4_group: int | None = None) -> ExpertFormat:
    """The routed experts' format: `expert_dtype` (fp32 | bf16 | fp16 | int8 | int4; None = the model's
    dtype), computed in the model's `dtype`; `int4_group` inputs per int4 scale (None = default)."""
    return ExpertFormat.parse(expert_dtype, parse_dtype(dtype), int4_group)


def build_empty_model(config: ModelConfig, dtype: str | torch.dtype = "fp32",
                      pin_memory: bool = False, expert_dtype: str | None = None,
                      int4_group: int | None = None) -> MoETransformer:
    """A model with uninitialised weights (to be filled by the loader or `build_dummy_model`).

    `pin_memory` page-locks the expert store (needs CUDA) so host-to-GPU expert copies can be async.
    `expert_dtype`/`int4_group`: the routed experts' format (see `expert_format`); quantised at load.
    Not thread-safe: construction briefly patches nn.Linear/nn.Embedding init and the default dtype.
    """
    torch_dtype = parse_dtype(dtype)
    store = ExpertStore(config, torch_dtype, pin_memory=pin_memory,
                        fmt=expert_format(torch_dtype, expert_dtype, int4_group))
    with _fast_init(torch_dtype):
        model = MoETransformer(config, torch_dtype, store=store)
    return model.eval()


def build_dummy_model(config: ModelConfig, dtype: str | torch.dtype = "fp32", seed: int = 0,
                      std: float = 0.02, pin_memory: bool = False, expert_dtype: str | None = None,
                      int4_group: int | None = None, dense_dtype: str | None = None,
                      lm_head_dtype: str | None = None) -> MoETransformer:
    """Random N(0, std) weights (norms 1, correction bias 0) for checkpoint-less benchmarks; dense linears
    then quantised to `dense_dtype` / `lm_head_dtype` (see `quantize_dense`)."""
    model = build_empty_model(config, dtype, pin_memory, expert_dtype, int4_group)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        model.expert_store.fill_random(gen, std)
    quantize_dense(model, dense_dtype, lm_head_dtype, int4_group)
    return model


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint directory, in load order."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index}: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise CheckpointError(f"{INDEX_FILE} names shard {name!r}, which is missing from {model_dir}")
        return [os.path.join(model_dir, name) for name in files]
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):   # ignore e.g. consolidated.safetensors
        return [os.path.join(model_dir, "model.safetensors")]
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {model_dir}")
    return [os.path.join(model_dir, n) for n in files]


class _Loader:
    """Tracks which expected tensors have arrived; routes each tensor to its destination."""

    def __init__(self, model: MoETransformer) -> None:
        self.model = model
        self.config = model.config
        self.store = model.expert_store
        self.params = dict(model.state_dict(keep_vars=True))   # name -> Parameter / persistent buffer
        if self.config.tie_word_embeddings:
            self.params.pop("lm_head.weight", None)
        self.pending_dense = set(self.params)
        self.pending_experts = {(layer, e, part) for layer in self.config.moe_layers
                                for e in range(self.config.num_experts) for part in ("gate", "up", "down")}

    def _ignored(self, name: str) -> bool:
        if name.endswith("rotary_emb.inv_freq"):   # old checkpoints save the RoPE table
            return True
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return True
        m = _LAYER.match(name)   # DeepSeek-V3 multi-token-prediction layers follow the last layer
        return bool(m and self.config.num_layers <= int(m.group(1))
                    < self.config.num_layers + self.config.num_nextn_predict_layers)

    def take(self, name: str, tensor: torch.Tensor, file: str) -> None:
        where = f"tensor {name!r} in {os.path.basename(file)}"
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if self._ignored(name):
            return
        if not tensor.is_floating_point():   # an integer/bool tensor would be cast silently by copy_
            raise CheckpointError(f"{where} has dtype {tensor.dtype}; expected floating-point weights")
        m = _PER_EXPERT.fullmatch(name)
        if m and m.group(3) in _PART:
            self._take_expert(int(m.group(1)), int(m.group(2)), _PART[m.group(3)], tensor, where)
            return
        m = _FUSED.fullmatch(name)
        if m:
            self._take_fused(int(m.group(1)), m.group(2), tensor, where)
            return
        param = self.params.get(name)
        if param is None:
            raise CheckpointError(f"unexpected {where}: the {self.config.model_type} model has no such weight")
        if name not in self.pending_dense:
            self._duplicate(where)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"misshaped {where}: shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        self.pending_dense.discard(name)

    @staticmethod
    def _duplicate(where: str) -> None:
        raise CheckpointError(f"duplicate {where}: this weight was already read from another tensor or file")

    def _check_layer(self, layer: int, expert: int, where: str) -> None:
        if layer not in self.store.layers or not 0 <= expert < self.config.num_experts:
            raise CheckpointError(f"unexpected {where}: no routed expert {expert} in layer {layer} "
                                  f"(MoE layers {list(self.config.moe_layers)}, "
                                  f"{self.config.num_experts} experts)")

    def _take_expert(self, layer: int, expert: int, part: str, tensor: torch.Tensor, where: str) -> None:
        self._check_layer(layer, expert, where)
        i, h = self.config.moe_intermediate_size, self.config.hidden_size
        want = (h, i) if part == "down" else (i, h)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"misshaped {where}: shape {tuple(tensor.shape)}, expected {want}")
        if (layer, expert, part) not in self.pending_experts:
            self._duplicate(where)
        self.store.set_expert(layer, expert, **{part: tensor})
        self.pending_experts.discard((layer, expert, part))

    def _take_fused(self, layer: int, kind: str, tensor: torch.Tensor, where: str) -> None:
        self._check_layer(layer, 0, where)
        e, i, h = self.config.num_experts, self.config.moe_intermediate_size, self.config.hidden_size
        want = (e, 2 * i, h) if kind == "gate_up_proj" else (e, h, i)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"misshaped {where}: shape {tuple(tensor.shape)}, expected {want}")
        parts = ("gate", "up") if kind == "gate_up_proj" else ("down",)
        keys = {(layer, x, p) for x in range(e) for p in parts}
        if not keys <= self.pending_experts:
            self._duplicate(where)
        if self.store.format.quantized:   # quantised at load, one expert at a time
            for x in range(e):
                if kind == "gate_up_proj":
                    self.store.set_gate_up(layer, x, tensor[x])
                else:
                    self.store.set_expert(layer, x, down=tensor[x])
            self.pending_experts -= keys
            return
        rows = self.store.layer_tensor(layer)                       # [E, 3*I*H]: [gate | up | down]
        n = i * h
        if kind == "gate_up_proj":   # [E, 2I, H]: rows 0..I-1 gate, I..2I-1 up -> flat [gate | up]
            rows[:, :2 * n].copy_(tensor.reshape(e, 2 * n))
        else:
            rows[:, 2 * n:].copy_(tensor.reshape(e, n))
        self.pending_experts -= keys

    def finish(self, model_dir: str) -> None:
        if not self.pending_experts:
            self.store.check_complete()
        if self.pending_dense:
            names = sorted(self.pending_dense)
            raise CheckpointError(f"missing tensor(s) in {model_dir}: {', '.join(names[:5])}"
                                  + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
        if self.pending_experts:
            layer, e, part = min(self.pending_experts)
            proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[part]
            fused = "down_proj" if part == "down" else "gate_up_proj"
            raise CheckpointError(f"missing tensor(s) in {model_dir}: routed expert weight "
                                  f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight (fused layout: "
                                  f"model.layers.{layer}.mlp.experts.{fused}) "
                                  f"({len(self.pending_experts)} expert matrices missing in all)")


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {exc}") from exc


def load_model(model_dir: str | os.PathLike, dtype: str | torch.dtype = "fp32",
               device: str | torch.device = "cpu", progress: bool = True,
               pin_memory: bool = False, expert_dtype: str | None = None,
               int4_group: int | None = None, dense_dtype: str | None = None,
               lm_head_dtype: str | None = None) -> MoETransformer:
    """Loads a Hugging Face MoE checkpoint directory (config.json + safetensors), or a GGUF file or
    directory (`hybrimoe.gguf.loader.load_gguf_model`), into a `MoETransformer`.

    Routed experts stay in host memory (`model.expert_store`, page-locked if `pin_memory`), in
    `expert_dtype` (None = `dtype`; int8/int4 are quantised from the checkpoint's floats as they load);
    dense weights go to `device`, the decoder layers' linears in `dense_dtype` and lm_head in
    `lm_head_dtype` (None = `dtype`; int8/int4 quantised after loading, `hybrimoe.models.quant_linear`).
    """
    model_dir = os.fspath(model_dir)
    if is_gguf_path(model_dir):   # a .gguf file, or a directory holding one and no config.json
        from hybrimoe.gguf.loader import load_gguf_model
        return load_gguf_model(model_dir, dtype, device, progress, pin_memory, expert_dtype, int4_group,
                               dense_dtype, lm_head_dtype)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"no config.json in {model_dir}")
    config = ModelConfig.from_pretrained(model_dir)
    files = checkpoint_files(model_dir)
    model = build_empty_model(config, dtype, pin_memory, expert_dtype, int4_group)
    loader = _Loader(model)
    handles = [(path, _open(path)) for path in files]
    total = sum(len(h.keys()) for _, h in handles)
    with tqdm(total=total, desc=f"loading {os.path.basename(model_dir.rstrip('/'))}", unit="tensor",
              disable=not progress or None) as bar:
        for path, handle in handles:
            with handle as f:
                for name in f.keys():
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError, ValueError) as exc:
                        raise CheckpointError(f"corrupt tensor {name!r} in {path}: {exc}") from exc
                    loader.take(name, tensor, path)
                    del tensor
                    bar.update(1)
    loader.finish(model_dir)
    log.info("loaded %s: %d layers, %d MoE layers x %d experts, experts (%s) %.1f MB in host memory",
             config.model_type, config.num_layers, len(config.moe_layers), config.num_experts,
             model.expert_store.format.describe(), model.expert_store.nbytes / 1e6)
    quantize_dense(model, dense_dtype, lm_head_dtype, int4_group)
    if torch.device(device).type != "cpu":
        model.to(device)
    return model
