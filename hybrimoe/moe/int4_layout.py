"""Nibble order of packed int4 weights: torch's CPU int4 kernel layout, found by probing, never assumed.

torch's `_weight_int4pack_mm_for_cpu` reads weights packed by `_convert_weight_to_int4pack_for_cpu`, whose
order depends on the machine (blocks of 64 rows on AVX-512, other blocks on AVX2, row order in a tail
block) and differs from CUDA's tinygemm. So the store packs at load, on the machine that runs it, and
packed bytes are never written to disk. `cpu_int4_layout(n, k)` probes the op on this machine with
index-coded matrices and describes what it does as row segments; the same description, in plain
torch ops on any device, packs a [N, K] code matrix (`pack`) and unpacks packed bytes (`unpack`), e.g.
on the GPU after an expert's packed bytes were copied there.

Nibble stream: byte i of a packed matrix holds nibble 2i (low 4 bits) and 2i+1 (high 4 bits).
"plain" layout: nibble n*K + k is code [n, k] (row-major). A segment (start, rows, block, perm) says that
the nibbles of rows start..start+rows-1 are ordered [rows/block, K, block] with local nibble j of a
block holding row `perm[j]` of that block.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PROBE_K = (128, 64, 256)  # row lengths of the probes: derive at the first, verify at the others


@dataclass(frozen=True)
class Segment:
    start: int  # first row
    rows: int  # rows covered (a multiple of block)
    block: int  # rows per block
    perm: tuple[int, ...]  # local nibble j of a block -> row offset in the block


@dataclass(frozen=True)
class Int4Layout:
    name: str  # "plain" | "cpu" (torch's CPU kernel order on this machine)
    segments: tuple[Segment, ...] = ()

    @property
    def cpu_kernel(self) -> bool:
        """True when the packed bytes are what torch's CPU int4 kernel reads."""
        return self.name == "cpu"

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes uint8 [N, K] (0..15) -> packed bytes uint8 [N*K/2] on the same device."""
        n, k = codes.shape
        if self.name == "plain":
            nibbles = codes.reshape(-1)
        else:
            parts = []
            for s in self.segments:
                block = codes[s.start:s.start + s.rows].view(s.rows // s.block, s.block, k)  # [B, block, K]
                parts.append(block.permute(0, 2, 1)[..., list(s.perm)].reshape(-1))  # [B, K, block] in nibble order
            nibbles = torch.cat(parts)
        pairs = nibbles.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def unpack(self, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """packed bytes uint8 [N*K/2] -> codes uint8 [N, K] (device-agnostic torch ops)."""
        if self.name == "plain":
            return torch.stack((packed & 15, packed >> 4), dim=-1).view(n, k)
        out = []
        for s in self.segments:
            blocks = s.rows // s.block
            half = s.block // 2
            if s.perm == _halves(s.block):  # byte j of a block row: low nibble row j, high nibble row j + block/2
                seg = packed[s.start * k // 2:(s.start + s.rows) * k // 2].view(blocks, k, half)
                rows = torch.cat((seg & 15, seg >> 4), dim=2)  # [B, K, block]
            else:
                seg = torch.stack((packed & 15, packed >> 4), dim=-1).view(-1)[s.start * k:(s.start + s.rows) * k]
                seg = seg.view(blocks, k, s.block)
                inverse = [0] * s.block
                for j, r in enumerate(s.perm):
                    inverse[r] = j
                rows = seg if s.perm == tuple(range(s.block)) else \
                    seg.index_select(2, torch.tensor(inverse, device=packed.device))
            out.append(rows.permute(0, 2, 1).reshape(s.rows, k))
        return torch.cat(out) if len(out) > 1 else out[0]


    def unpack_into(self, packed: torch.Tensor, n: int, k: int, out: torch.Tensor) -> torch.Tensor:
        """Like `unpack`, but converts the codes straight into `out` [N, K] (any dtype, e.g. a reused
        bf16 workspace): no [N, K] temporaries, which on the CPU cost more than the arithmetic (every
        fresh large allocation page-faults)."""
        if self.name == "plain":
            pairs = out.view(n, k // 2, 2)
            src = packed.view(n, k // 2)
            pairs[..., 0].copy_(src & 15)
            pairs[..., 1].copy_(src >> 4)
            return out
        for s in self.segments:
            blocks, half = s.rows // s.block, s.block // 2
            seg = packed[s.start * k // 2:(s.start + s.rows) * k // 2].view(blocks, k, half)
            dst = out[s.start:s.start + s.rows].view(blocks, s.block, k).permute(0, 2, 1)  # [B, K, block]
            if s.perm == _halves(s.block):
                dst[..., :half].copy_(seg & 15)
                dst[..., half:].copy_(seg >> 4)
            elif s.perm == tuple(range(s.block)):
                pairs = dst.unflatten(-1, (half, 2))
                pairs[..., 0].copy_(seg & 15)
                pairs[..., 1].copy_(seg >> 4)
            else:
                codes = self.unpack(packed, n, k)
                return out.copy_(codes)
        return out


PLAIN = Int4Layout("plain")


def _halves(block: int) -> tuple[int, ...]:
    """perm of the order (row 0, row block/2, row 1, row block/2 + 1, ...): torch's AVX-512 blocks."""
    return tuple(r for j in range(block // 2) for r in (j, j + block // 2))


def _torch_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2).reshape(-1)


def _positions(n: int, k: int) -> torch.Tensor:
    """For every nibble of torch's packed [n, k] matrix, the flat source index n_*k + k_ it holds."""
    total = n * k
    index = torch.arange(total).view(n, k)
    source = torch.zeros(total, dtype=torch.long)
    for digit in range(((total - 1).bit_length() + 3) // 4):  # one probe per base-16 digit of the index
        packed = _torch_pack((index >> (4 * digit)) & 15)
        nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).view(-1).long()
        source |= nibbles << (4 * digit)
    return source


def _derive(n: int, k: int) -> Int4Layout | None:
    """Segments from the probe at (n, k); None when torch's order does not have that form."""
    source = _positions(n, k)
    where = torch.empty_like(source)
    where[source] = torch.arange(source.numel())
    where = where.view(n, k)  # nibble position of code [row, col]
    step = where[:, 1] - where[:, 0]  # = block size of the row's block
    segments, row = [], 0
    while row < n:
        block = int(step[row])
        if block <= 0 or row + block > n:
            return None
        base = row * k
        local = where[row:row + block, 0] - base  # [block] in 0..block-1
        if sorted(local.tolist()) != list(range(block)):
            return None
        perm = [0] * block
        for r, j in enumerate(local.tolist()):
            perm[j] = r
        seg = Segment(row, block, block, tuple(perm))
        prev = segments[-1] if segments else None
        if prev is not None and prev.block == block and prev.perm == seg.perm:
            segments[-1] = Segment(prev.start, prev.rows + block, block, seg.perm)
        else:
            segments.append(seg)
        row += block
    return Int4Layout("cpu", tuple(segments))


@functools.lru_cache(maxsize=None)
def cpu_int4_layout(n: int) -> Int4Layout:
    """torch's CPU int4 packing of matrices with `n` rows on this machine (PLAIN where the op refuses
    the shape or its order cannot be described by segments). Checked on random codes at several K."""
    if n % 16:
        return PLAIN
    try:
        layout = _derive(n, PROBE_K[0])
        if layout is None:
            log.warning("int4: torch's CPU packing of %d rows has an unknown order; using the plain layout", n)
            return PLAIN
        gen = torch.Generator().manual_seed(n)
        for k in PROBE_K:
            codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
            if not torch.equal(layout.pack(codes), _torch_pack(codes).to(torch.uint8)):
                log.warning("int4: torch's CPU packing of %d rows depends on K; using the plain layout", n)
                return PLAIN
        return layout
    except RuntimeError as exc:  # the op is missing or refuses the shape
        log.info("int4: torch's CPU int4 kernel unavailable for %d rows (%s); plain layout", n, exc)
        return PLAIN
