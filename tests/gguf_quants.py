"""Test-side quantisers for tests/gguf_writer.py: gguf-py's where it has one, a plain Q4_K, random
Q5_K / Q6_K blocks."""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 [..., K] (K % 256 == 0) -> Q4_K blocks uint8 [..., K/256*144].

    Per sub-block of 32: offset m = -min(x, 0), scale s = (max(x) - min(x, 0)) / 15, both stored as
    6-bit multiples of the super-block's fp16 d / dmin; x ~ d*sc*q - dmin*m with q in 0..15.
    """
    shape = rows.shape
    x = rows.reshape(-1, 8, 32).astype(np.float32)                      # [blocks, sub, 32]
    lo = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - lo) / 15.0
    offset = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)                       # [blocks]
    dmin = (offset.max(-1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dminf > 0, np.rint(offset / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.rint((x + (dminf * mn)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)                       # layout of gguf's Q4_K.get_scale_min
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(x.shape[0], 128)    # byte g*32+l: sub 2g low, 2g+1 high
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], 1)
    return blocks.reshape(*shape[:-1], shape[-1] // 256 * 144)


def quantize(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """gguf-py's quantiser (ours for Q4_K); a row that does not fit falls back to F16 (prepare_tensors)."""
    try:
        if qtype == Q.Q4_K:
            if data.shape[-1] % 256:
                raise gguf.QuantError("row not a multiple of 256")
            return quantize_q4_k(data), qtype
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16


def random_blocks(shape: tuple[int, ...], qtype: Q, seed: int = 0) -> np.ndarray:
    """Random Q5_K / Q6_K blocks (gguf-py has no quantiser for them) for float shape [..., K]; the fp16
    super-block scales are set to small normal values so the weights stay in a sane range."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    if qtype == Q.Q6_K:      # ql[128] qh[64] scales int8[16] d f16
        rows[..., 192:208] = rng.integers(-8, 8, rows[..., 192:208].shape).astype(np.int8).view(np.uint8)
        rows[..., 208:210] = np.full(rows.shape[:-1] + (1,), 0.0005, np.float16).view(np.uint8)
    elif qtype == Q.Q5_K:    # d f16, dmin f16, scales[12], qh[32], qs[128]
        rows[..., 0:2] = np.full(rows.shape[:-1] + (1,), 0.0002, np.float16).view(np.uint8)
        rows[..., 2:4] = np.full(rows.shape[:-1] + (1,), 0.0001, np.float16).view(np.uint8)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return rows.reshape(*shape[:-1], -1)
