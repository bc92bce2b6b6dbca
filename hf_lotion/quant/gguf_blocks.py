"""GGUF `Q4_0` / `Q8_0` blocks written from trained integer levels and scales, without re-rounding.

A block holds 32 consecutive weights of one row: an fp16 scale `d` and 32 levels. `Q4_0` (18 bytes) stores
`nibble = q + 8` with elements 0-15 in the low nibbles of bytes 0-15 and elements 16-31 in the high nibbles,
value `(nibble - 8) * d`; `Q8_0` (34 bytes) stores `q` as int8, value `q * d`. Any fp16 `d` is valid (llama.cpp's
own quantizer is just one way to choose it), so a layer whose groups are a multiple of 32 long, whose levels
fit the block's range and whose scales are fp16 values maps exactly: every block takes its group's scale.
llama.cpp dequantizes `d * q` in fp32, which is exact (an 11-bit mantissa times an 8-bit integer), so it equals
our fp32 eval weight `s * q` bit for bit.

`TQ2_0` (66 bytes per 256 weights) holds ternary levels {-1, 0, 1} with one fp16 scale per 256: a 2-bit layer
on the restricted grid (absmax scales use only -1, 0, 1) with groups a multiple of 256 maps exactly. Levels
are stored as `q + 1` in 2 bits; in each 128-weight half, byte `j` holds elements `j`, `j + 32`, `j + 64`,
`j + 96` at bits 0, 2, 4, 6; the scale follows the 64 bytes of levels.

Pure PyTorch/NumPy (no gguf import): `hf_lotion.gguf_export` builds the file around these.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import resolve_group_size

BLOCK = 32  # weights per Q4_0 / Q8_0 block
TERNARY_BLOCK = 256  # weights per TQ2_0 block
# Levels each block type holds: Q4_0 any 2-, 3- or 4-bit grid (levels within -8..7), Q8_0 8 bits.
Q4_0_RANGE = (-8, 7)
Q8_0_RANGE = (-128, 127)


def gguf_block_type(bits: int) -> str:
    """The GGUF type that holds a symmetric `bits`-bit grid exactly: "Q4_0" for 2-4 bits, "Q8_0" for 8."""
    return "Q8_0" if bits == 8 else "Q4_0"


def fp16_exact(scales: torch.Tensor) -> bool:
    """Whether every scale is a finite value that fp16 represents exactly (so `d = scale` loses nothing)."""
    as_fp16 = scales.detach().to(torch.float16)
    return bool(torch.isfinite(as_fp16).all()) and torch.equal(as_fp16.to(scales.dtype), scales.detach())


def fits_blocks(group_size: int, in_features: int, block: int = BLOCK) -> bool:
    """Whether every `block`-long block of a row lies inside one group (the group, or the row for -1, is a
    multiple of `block`)."""
    return resolve_group_size(group_size, in_features) % block == 0


def _block_scales(scales: torch.Tensor, group_size: int, in_features: int, block: int = BLOCK) -> np.ndarray:
    """Each block's fp16 scale as 2 little-endian bytes, `(out, in / block, 2)` uint8."""
    per_group = resolve_group_size(group_size, in_features) // block
    d = scales.detach().to(torch.float16).repeat_interleave(per_group, dim=1)
    return d.cpu().numpy().astype("<f2").view(np.uint8).reshape(d.shape[0], d.shape[1], 2)


def q4_0_blocks(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """`Q4_0` bytes `(out, in / 32 * 18)` for levels `q` (int, `(out, in)`, within -8..7) and group scales.

    Example:
        >>> q = torch.arange(32).remainder(16).sub(8).reshape(1, 32)
        >>> q4_0_blocks(q, torch.tensor([[0.5]]), group_size=32)[0, :4].tolist()  # d = 0.5 (0x3800), then u0 | u16 << 4
        [0, 56, 0, 17]
    """
    out_features, in_features = q.shape
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8).reshape(out_features, in_features // BLOCK, BLOCK)
    packed = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)
    d = _block_scales(scales, group_size, in_features)
    return np.concatenate([d, packed.cpu().numpy()], axis=-1).reshape(out_features, -1)


def q8_0_blocks(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """`Q8_0` bytes `(out, in / 32 * 34)` for levels `q` (within -128..127) and group scales."""
    out_features, in_features = q.shape
    levels = q.to(torch.int8).reshape(out_features, in_features // BLOCK, BLOCK).cpu().numpy().view(np.uint8)
    d = _block_scales(scales, group_size, in_features)
    return np.concatenate([d, levels], axis=-1).reshape(out_features, -1)


def tq2_0_blocks(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """`TQ2_0` bytes `(out, in / 256 * 66)` for ternary levels `q` (within -1..1) and group scales."""
    out_features, in_features = q.shape
    n_blocks = in_features // TERNARY_BLOCK
    # (out, block, half, slot k, byte j) -> element half * 128 + k * 32 + j, at bits 2k of byte j.
    u = (q.to(torch.int16) + 1).to(torch.uint8).reshape(out_features, n_blocks, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 1, 4, 1)
    packed = (u << shifts).sum(dim=3, dtype=torch.uint8).reshape(out_features, n_blocks, 64)
    d = _block_scales(scales, group_size, in_features, TERNARY_BLOCK)
    return np.concatenate([packed.cpu().numpy(), d], axis=-1).reshape(out_features, -1)


def gguf_blocks(q: torch.Tensor, scales: torch.Tensor, kind: str, group_size: int) -> np.ndarray:
    """The exact blocks of GGUF type `kind` ("Q4_0", "Q8_0", "TQ2_0") for one layer (the caller checks that
    the layer fits: `fits_blocks`, `fp16_exact`, the levels' range)."""
    encode = {"Q4_0": q4_0_blocks, "Q8_0": q8_0_blocks, "TQ2_0": tq2_0_blocks}[kind]
    return encode(q, scales, group_size)
