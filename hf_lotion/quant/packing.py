"""Dense bit-packing of signed integer levels into little-endian 32-bit words (compressed-tensors layout).

Each row is one little-endian bit stream. Level `q` is stored unsigned as `u = q + 2**(bits-1)`, and
element `i` of a row occupies bits `[i*bits, (i+1)*bits)` of that stream; bit `k` of the stream is bit
`k % 32` of word `k // 32`. Values may straddle two words (3 bits), and the last word of a row is
zero-padded, so a row of `n` elements takes `ceil(n * bits / 32)` words whatever `n` is: any
in_features packs, and `weight_shape` says where each row ends.

4 bits, one word holds elements 0..7 (u0 in the lowest nibble)::

    bit   31      28 27      24       ...        7       4 3       0
          [   u7   ][   u6   ]        ...        [   u1   ][   u0   ]

3 bits, element 10 straddles words 0 and 1::

    word 0: bits 0-29 = u0..u9, bits 30-31 = low 2 bits of u10
    word 1: bit 0 = high bit of u10, bits 1-3 = u11, ...
"""

from __future__ import annotations

import math

import torch

_WORD = 32
_MASK32 = (1 << _WORD) - 1


def packed_words(in_features: int, bits: int) -> int:
    """Words per row: `ceil(in_features * bits / 32)`."""
    return math.ceil(in_features * bits / _WORD)


def _bit_positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // _WORD, start % _WORD


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed levels `q` `(rows, n)` (values in `[-2**(bits-1), 2**(bits-1)-1]`) into int32 words.

    Example:
        >>> pack_int(torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4]], dtype=torch.int8), 4)
        tensor([[-878053360]], dtype=torch.int32)
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int expects a 2-D tensor of levels, got shape {tuple(q.shape)}.")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(
            f"pack_int got levels in [{int(q.min())}, {int(q.max())}]; allowed for {bits} bits: [{qmin}, {qmax}]."
        )
    rows, n = q.shape
    unsigned = q.to(torch.int64) + (1 << (bits - 1))
    word, offset = _bit_positions(n, bits, q.device)
    words = torch.zeros(rows, packed_words(n, bits) + 1, dtype=torch.int64, device=q.device)
    # Low part into the element's word; bits that spill over the word go into the next one.
    words.scatter_add_(1, word.expand(rows, n), (unsigned << offset) & _MASK32)
    words.scatter_add_(1, (word + 1).expand(rows, n), unsigned >> (_WORD - offset))
    words = words[:, :-1]
    # Reinterpret the unsigned 32-bit values as int32 (two's complement).
    return (words - ((words >> 31) << 32)).to(torch.int32)


def unpack_int(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int`: the first `n` signed levels of each row, as int8.

    Example:
        >>> unpack_int(torch.tensor([[-878053360]], dtype=torch.int32), 4, 8)
        tensor([[-8, -7,  0,  7,  1,  2,  3,  4]], dtype=torch.int8)
    """
    if packed.dim() != 2 or packed.shape[1] != packed_words(n, bits):
        raise ValueError(
            f"unpack_int got packed shape {tuple(packed.shape)}; for {n} elements of {bits} bits each row "
            f"needs {packed_words(n, bits)} int32 words."
        )
    if _WORD % bits == 0:
        return _unpack_aligned(packed, bits, n)
    return _unpack_any(packed, bits, n)


def _unpack_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """2, 4 and 8 bits: no value crosses a word, so one broadcast shift per slot unpacks everything."""
    per_word = _WORD // bits
    shifts = torch.arange(0, _WORD, bits, dtype=torch.int32, device=packed.device)
    # Arithmetic shifts of negative words smear the sign bit, but the mask keeps only the slot's bits.
    unsigned = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    levels = unsigned.reshape(packed.shape[0], packed.shape[1] * per_word)[:, :n]
    return (levels - (1 << (bits - 1))).to(torch.int8)


def _unpack_any(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Any width (3 bits straddles words): gather each element's word and the next one."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & _MASK32
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], dim=1)
    word, offset = _bit_positions(n, bits, packed.device)
    low = words[:, word] >> offset
    high = words[:, word + 1] << (_WORD - offset)
    unsigned = (low | high) & ((1 << bits) - 1)
    return (unsigned - (1 << (bits - 1))).to(torch.int8)
