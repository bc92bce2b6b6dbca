"""Packed layers on PyTorch's CPU int4/int8 kernels: layout round trip, numerics table, dispatch, lifecycle, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import hf_lotion
from hf_lotion.kernels import cpu_int4, cpu_int8, kernel_backend
from hf_lotion.nn import LotionLinear, PackedLinear
from hf_lotion.quant import QuantSpec, dequantize, pack_int

pytestmark = pytest.mark.skipif(not cpu_int4.ops_available(), reason="this torch build has no CPU int4 ops")

# Kernel output vs the exact product of the same dequantized weights (float64), as a share of the largest
# |output|: the kernel accumulates in float32 in its own order and rounds once to the output dtype.
# Measured worst cases over the cases below: fp32 6.9e-7, bf16 6.3e-3. (fp16 layers keep packed words: the
# kernel runs scalar code for fp16, slower than dequantize + F.linear.)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}
DTYPES = list(TOLERANCE)


def qat_layer(out_features, in_features, bits, group_size, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return LotionLinear.from_linear(linear, QuantSpec(bits=bits, group_size=group_size)).eval()


def kernel_layer(*args, **kwargs) -> PackedLinear:
    layer = PackedLinear.from_qat(qat_layer(*args, **kwargs))
    assert layer.prepare_cpu_kernel_()
    return layer


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 144, 208], ids=lambda r: f"N{r}")
@pytest.mark.parametrize("columns", [32, 96, 576], ids=lambda c: f"K{c}")
def test_levels_survive_the_kernel_layout(rows, columns):
    """Every 64-, 32- and 16-row block shape of the converter's layout reads back to the levels put in."""
    torch.manual_seed(rows * columns)
    levels = torch.randint(-8, 8, (rows, columns), dtype=torch.int8)
    packed = cpu_int4.to_int4pack(levels)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, columns // 2)
    assert torch.equal(cpu_int4.from_int4pack(packed, rows, columns), levels)
    scales = torch.rand(rows, columns // 32, dtype=torch.bfloat16) + 0.01
    expected = dequantize(levels, scales, 32, torch.bfloat16)
    assert torch.equal(cpu_int4.dequantize_int4pack(packed, scales, 32, columns), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize(
    "out_features,in_features,group_size",
    [(16, 96, 32), (48, 320, 64), (80, 384, 128), (16, 512, 256), (48, 160, -1), (208, 96, -1)],
    ids=lambda v: str(v),
)
def test_kernel_matches_the_exact_product_within_the_table(
    out_features, in_features, group_size, bits, dtype
):
    """The op itself at every dtype (the layer calls it only where it is fast: see the dispatch tests)."""
    layer = kernel_layer(out_features, in_features, bits, group_size, dtype)
    weight = layer.dequantized_weight().double()
    for rows in (1, 3, 17):
        x = torch.randn(rows, in_features, dtype=dtype)
        out = cpu_int4.int4_mm(x, layer.weight, layer.int4_scales_and_zeros)
        exact = F.linear(x.double(), weight)
        assert out.dtype == dtype and out.shape == exact.shape
        error = (out.double() - exact).abs().max() / exact.abs().max()
        assert error <= TOLERANCE[dtype], (rows, float(error))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [(), (2,)], ids=["2d", "3d"])
def test_the_kernel_runs_up_to_the_crossover_and_dequantize_above(dtype, batch, monkeypatch):
    calls = []
    real = cpu_int4.int4_mm
    monkeypatch.setattr(cpu_int4, "int4_mm", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    layer = kernel_layer(32, 64, 4, 32, dtype)
    limit = cpu_int4.max_kernel_rows(dtype) // (batch[0] if batch else 1)
    weight = layer.dequantized_weight().double()
    with torch.no_grad():
        if limit:
            x = torch.randn(*batch, limit, 64, dtype=dtype)
            out = layer(x)
            assert calls == [x.numel() // 64] and out.shape == (*batch, limit, 32)
            exact = F.linear(x.double(), weight, layer.bias.double())
            assert (out.double() - exact).abs().max() / exact.abs().max() <= TOLERANCE[dtype]
        above = torch.randn(*batch, limit + 1, 64, dtype=dtype)
        assert torch.equal(layer(above), F.linear(above, layer.dequantized_weight(), layer.bias))
        assert len(calls) == (1 if limit else 0)


def test_small_products_run_on_one_thread_when_idle_threads_sleep(monkeypatch):
    seen = []
    kernel = lambda *args: seen.append(torch.get_num_threads()) or cpu_int4.int4_mm(*args)  # noqa: E731
    layer = kernel_layer(32, 64, 4, 32, torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cases = [
            (True, 64 * 32, x, 1),
            (True, 1 << 24, x, 2),
            (False, 64 * 32, x, 2),
            (True, 64 * 32, x.float(), 2),
        ]
        for sleeping, macs, inputs, expected in cases:
            monkeypatch.setattr(cpu_int4, "THREADS_SLEEP", sleeping)
            scales_and_zeros = layer.int4_scales_and_zeros.to(inputs.dtype)
            out = cpu_int4.run_kernel(kernel, macs, inputs, layer.weight, scales_and_zeros)
            assert seen[-1] == expected and torch.get_num_threads() == 2
            assert torch.equal(out, cpu_int4.int4_mm(inputs, layer.weight, scales_and_zeros))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backend_is_bit_exact_on_the_kernel_copy(dtype, monkeypatch):
    monkeypatch.setattr(cpu_int4, "int4_mm", lambda *args: pytest.fail("the kernel ran under reference"))
    qat = qat_layer(48, 96, 4, 32, dtype)
    layer = kernel_layer(48, 96, 4, 32, dtype)
    x = torch.randn(1, 96, dtype=dtype)
    with torch.no_grad(), kernel_backend("reference"):
        assert torch.equal(layer(x), qat(x))


def test_nan_in_inputs_and_scales_reaches_the_same_outputs():
    layer = kernel_layer(32, 64, 4, 32, torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    x[0, 5] = float("nan")
    with torch.no_grad():
        assert layer(x).isnan().all()
        # A NaN scale (what NaN weights give in training) reaches the kernel through the shared storage.
        layer.weight_scale[3, 1] = float("nan")
        assert layer.int4_scales_and_zeros[1, 3, 0].isnan()
        x = torch.randn(1, 64, dtype=torch.bfloat16)
        out = layer(x)
        reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert (
        out.isnan().squeeze(0).tolist()
        == reference.isnan().squeeze(0).tolist()
        == [i == 3 for i in range(32)]
    )


def test_layers_the_kernel_cannot_take_keep_packed_words():
    cases = {
        "out_features not a multiple of 16": qat_layer(40, 64, 4, 32),
        "group size 16": qat_layer(32, 64, 4, 16),
        "8 bits, groups": qat_layer(32, 64, 8, 32, torch.bfloat16),
        "8 bits per row, float32 (the int8 kernel is scalar code there)": qat_layer(32, 64, 8, -1),
        "8 bits per row, in_features not a multiple of 16": qat_layer(32, 104, 8, -1, torch.bfloat16),
        "per-row, in_features not a multiple of 32": qat_layer(32, 48, 4, -1),
        "float64": qat_layer(32, 64, 4, 32, torch.float64),
        "float16 (the kernel is scalar code there)": qat_layer(32, 64, 4, 32, torch.float16),
    }
    for reason, qat in cases.items():
        layer = PackedLinear.from_qat(qat)
        assert not layer.prepare_cpu_kernel_(), reason
        assert layer.weight.dtype == torch.int32 and not layer.cpu_kernel_ready, reason
        x = torch.randn(2, qat.in_features, dtype=qat.weight.dtype)
        with torch.no_grad():
            assert torch.equal(layer(x), qat(x)), reason


def test_the_kernel_copy_replaces_the_words_and_shares_the_scales():
    canonical = PackedLinear.from_qat(qat_layer(64, 256, 4, 64, torch.bfloat16))
    layer = kernel_layer(64, 256, 4, 64, torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (64, 128)
    assert (
        layer.weight_scale.untyped_storage().data_ptr()
        == layer.int4_scales_and_zeros.untyped_storage().data_ptr()
    )
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in layer.buffers()}
    bf16_bytes = 64 * 256 * 2
    # Half a byte per weight, plus scales and zeros (bf16, group 64): 0.28 of bf16.
    assert sum(held.values()) <= 0.3 * bf16_bytes
    assert torch.equal(layer.packed_weight(), canonical.weight)
    assert torch.equal(layer.int_weight(), canonical.int_weight())
    state, expected = layer.state_dict(), canonical.state_dict()
    assert set(state) == set(expected)
    for key in expected:
        assert torch.equal(state[key], expected[key]) and state[key].is_contiguous(), key


def test_state_dict_load_release_and_requantize_keep_the_layouts_in_step():
    source = PackedLinear.from_qat(qat_layer(32, 128, 3, 32, seed=1))
    layer = kernel_layer(32, 128, 3, 32, seed=2)
    layer.load_state_dict(source.state_dict())
    assert layer.cpu_kernel_ready and torch.equal(layer.dequantized_weight(), source.dequantized_weight())

    new_weight = source.dequantized_weight() + 0.05 * torch.randn(32, 128)
    source.requantize_(new_weight)
    layer.requantize_(new_weight)
    assert layer.cpu_kernel_ready
    assert torch.equal(layer.packed_weight(), source.weight)
    assert torch.equal(layer.int4_scales_and_zeros[..., 0].t(), source.weight_scale)

    layer.release_cpu_kernel_()
    assert layer.weight.dtype == torch.int32 and not hasattr(layer, "int4_scales_and_zeros")
    assert torch.equal(layer.weight, source.weight) and torch.equal(layer.weight_scale, source.weight_scale)


def test_gradients_through_the_kernel_copy_equal_the_reference():
    canonical = PackedLinear.from_qat(qat_layer(32, 64, 4, 32))
    layer = kernel_layer(32, 64, 4, 32)
    x = torch.randn(3, 64)
    grads = []
    for module in (canonical, layer):
        inputs = x.clone().requires_grad_()
        with kernel_backend("reference"):
            module(inputs).square().sum().backward()
        grads.append((inputs.grad, module.bias.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_a_layer_moved_to_another_dtype_or_device_runs_from_its_copy():
    words = PackedLinear.from_qat(qat_layer(32, 64, 4, 32)).double()
    layer = kernel_layer(32, 64, 4, 32).double()
    x = torch.randn(2, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(layer(x), words(x))
    if torch.cuda.is_available():
        moved = kernel_layer(32, 64, 4, 32).cuda()
        with torch.no_grad():
            out = moved(torch.randn(2, 64, device="cuda"))
        assert out.is_cuda and not moved.cpu_kernel_ready


def test_convert_and_from_pretrained_prepare_every_layer_the_kernel_takes(
    tiny_checkpoint, input_ids, tmp_path
):
    path = tiny_checkpoint("llama", torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=hf_lotion.LotionConfig(bits=4, group_size=32)
    ).eval()
    with torch.no_grad():
        qat_logits = model(input_ids).logits
    hf_lotion.convert(model)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.cpu_kernel_ready for m in packed)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    name = next(n for n, m in model.named_modules() if isinstance(m, PackedLinear))
    words = pack_int(model.get_submodule(name).int_weight(), 4)
    assert saved[f"{name}.weight"].dtype == torch.int32 and torch.equal(saved[f"{name}.weight"], words)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(m.cpu_kernel_ready for m in reloaded.modules() if isinstance(m, PackedLinear))
    with torch.no_grad():
        with kernel_backend("reference"):
            assert torch.equal(reloaded(input_ids).logits, qat_logits)
        decode = reloaded(input_ids[:, :1]).logits.double()
        with kernel_backend("reference"):
            reference = reloaded(input_ids[:, :1]).logits.double()
    assert ((decode - reference).abs().max() / reference.abs().max()) <= 2 * TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(
    not cpu_int8.ops_available(), reason="this torch build has no CPU int8 weight-only matmul"
)
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (40, 112), (208, 576)], ids=str)
def test_bf16_8bit_per_row_layers_run_the_int8_kernel(out_features, in_features, monkeypatch):
    calls = []
    real = cpu_int8.int8_mm
    monkeypatch.setattr(cpu_int8, "int8_mm", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    canonical = PackedLinear.from_qat(qat_layer(out_features, in_features, 8, -1, torch.bfloat16))
    layer = PackedLinear.from_qat(qat_layer(out_features, in_features, 8, -1, torch.bfloat16))
    assert layer.prepare_cpu_kernel_() and layer.weight.dtype == torch.int8
    assert torch.equal(layer.int_weight(), canonical.int_weight())
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in canonical.state_dict().items()
    }
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in canonical.state_dict().items())
    limit = cpu_int8.max_kernel_rows(torch.bfloat16)
    weight = canonical.dequantized_weight().double()
    with torch.no_grad():
        for rows in (1, limit):
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            exact = F.linear(x.double(), weight, canonical.bias.double())
            error = (layer(x).double() - exact).abs().max() / exact.abs().max()
            assert error <= TOLERANCE[torch.bfloat16], float(error)
        assert calls == [1, limit]
        x = torch.randn(limit + 1, in_features, dtype=torch.bfloat16)
        assert torch.equal(layer(x), canonical(x))
        with kernel_backend("reference"):
            x = torch.randn(1, in_features, dtype=torch.bfloat16)
            assert torch.equal(layer(x), canonical(x))
    assert calls == [1, limit]
    layer.release_cpu_kernel_()
    assert torch.equal(layer.weight, canonical.weight)


def test_pickling_stores_packed_words_and_unpickling_prepares_again():
    """The kernel's nibble layout depends on the CPU's vector width: a pickle must not carry it."""
    import pickle

    layer = kernel_layer(64, 128, 4, 32, torch.bfloat16)
    state = layer.__getstate__()
    assert (
        state["_buffers"]["weight"].dtype == torch.int32 and "int4_scales_and_zeros" not in state["_buffers"]
    )
    assert "weight" not in state["_non_persistent_buffers_set"]
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.cpu_kernel_ready and layer.cpu_kernel_ready  # the original is left as it was
    assert torch.equal(restored.packed_weight(), layer.packed_weight())
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(restored(x), layer(x))


@pytest.mark.parametrize("group_size,in_features", [(-1, 512), (32, 128)], ids=["per-row-repeated", "groups"])
@pytest.mark.parametrize("change", ["in place", "dtype round trip"])
def test_changed_scales_reach_the_kernel(group_size, in_features, change):
    """Decode-sized inputs (the kernel) and larger ones (dequantize) use the same, current scales."""
    layer = kernel_layer(32, in_features, 4, group_size, torch.bfloat16)
    with torch.no_grad():
        if change == "in place":
            layer.weight_scale.mul_(2)
        else:
            layer.float().to(torch.bfloat16)
            layer.weight_scale.mul_(2)
        x = torch.randn(1, in_features, dtype=torch.bfloat16)
        decode = layer(x).double()
        exact = F.linear(x.double(), layer.dequantized_weight().double(), layer.bias.double())
    assert (decode - exact).abs().max() / exact.abs().max() <= TOLERANCE[torch.bfloat16]


def test_loading_a_state_dict_without_this_layers_weights_leaves_its_copy_alone():
    layer = kernel_layer(32, 64, 4, 32, torch.bfloat16)
    copy = layer.weight
    layer.load_state_dict({"bias": torch.zeros(32, dtype=torch.bfloat16)}, strict=False)
    assert layer.weight is copy and torch.equal(layer.bias, torch.zeros(32, dtype=torch.bfloat16))


def test_autocast_takes_the_f_linear_path():
    layer = kernel_layer(32, 64, 4, 32, torch.float32)
    x = torch.randn(1, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
