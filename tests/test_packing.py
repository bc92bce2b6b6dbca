"""Bit packing: exact round trips, the documented bit layout, and agreement with compressed-tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_lotion import LotionLinear, PackedLinear, QuantSpec
from hf_lotion.quant import int_range, pack_int, packed_words, unpack_int

BITS = [2, 3, 4, 8]


def random_levels(rows, n, bits, seed=0):
    qmin, qmax = int_range(bits)
    return torch.randint(
        qmin, qmax + 1, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int8
    )


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 31), (2, 32), (7, 33), (4, 100), (3, 129)], ids=str)
def test_pack_unpack_round_trip_is_exact(bits, rows, n):
    q = random_levels(rows, n, bits, seed=bits * 1000 + n)
    packed = pack_int(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_words(n, bits))
    assert torch.equal(unpack_int(packed, bits, n), q)


def test_documented_bit_layout():
    # 4 bits: element i in bits [4i, 4i+4) of word 0, offset by +8.
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4]], dtype=torch.int8)
    expected = sum((v + 8) << (4 * i) for i, v in enumerate(q[0].tolist()))
    assert pack_int(q, 4).item() & 0xFFFFFFFF == expected
    # 3 bits: element 10 straddles words 0 and 1 (bits 30-32).
    q3 = torch.full((1, 12), -4, dtype=torch.int8)
    q3[0, 10] = 3  # unsigned 7 = 0b111
    words = pack_int(q3, 3).to(torch.int64) & 0xFFFFFFFF
    assert (words[0, 0] >> 30).item() == 0b11 and (words[0, 1] & 1).item() == 1
    # The tail of the last word is zero padding.
    assert (pack_int(torch.full((1, 3), -2, dtype=torch.int8), 2) == 0).all()


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("n", [32, 48, 100, 128])
def test_matches_compressed_tensors_packing(bits, n):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = random_levels(3, n, bits, seed=n)
    assert torch.equal(pack_int(q, bits), helpers.pack_to_int32(q, bits))


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match=r"levels in \[-3, 1\]; allowed for 2 bits: \[-2, 1\]"):
        pack_int(torch.tensor([[-3, 1]], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="2-D"):
        pack_int(torch.zeros(4, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=r"needs 2 int32 words"):
        unpack_int(torch.zeros(1, 3, dtype=torch.int32), 4, 16)


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, -1), (4, 32), (8, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_packed_linear_equals_eval_mode_qat_linear(bits, group_size, dtype):
    torch.manual_seed(bits)
    qat = LotionLinear.from_linear(
        nn.Linear(96, 13).to(dtype), QuantSpec(bits=bits, group_size=group_size)
    ).eval()
    packed = PackedLinear.from_qat(qat)
    x = torch.randn(4, 96).to(dtype)
    assert torch.equal(packed(x), qat(x))
    assert torch.equal(packed.dequantized_weight(), qat.deploy_weight())
    assert packed.weight.dtype == torch.int32 and packed.weight_scale.dtype == dtype
    assert packed.weight_shape.tolist() == [13, 96]
    # Integers and scales are buffers; the bias is a trainable copy, and the QAT layer keeps its own.
    assert [name for name, p in packed.named_parameters() if p.requires_grad] == ["bias"]
    assert qat.bias.requires_grad and packed.bias is not qat.bias


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
def test_aligned_fast_path_equals_general_path(bits):
    from hf_lotion.quant.packing import _unpack_aligned, _unpack_any

    for n in (1, 15, 33, 100):
        packed = pack_int(random_levels(6, n, bits, seed=n), bits)
        assert torch.equal(_unpack_aligned(packed, bits, n), _unpack_any(packed, bits, n))
