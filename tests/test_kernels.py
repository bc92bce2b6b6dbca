"""Triton kernels against the plain-PyTorch reference, on odd shapes, for outputs and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before triton
is imported); the same tests run on CUDA under the `gpu` marker. Exact math is compared bit for bit
(fake-quant forward, absmax scales, dequantized packed weights); accumulations and
transcendental functions against a (dtype, atol, rtol) table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_lotion import kernels, quant
from hf_lotion.kernels import dispatch
from hf_lotion.nn import LotionLinear, PackedLinear
from hf_lotion.quant import QuantSpec
from hf_lotion.quant.lotion import add_penalty_grad

pytest.importorskip("triton")

DEVICES = [
    pytest.param("cpu", id="interpreter"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
# (bits, group_size, in_features): odd row counts below; group sizes that are not powers of two; per-row.
LAYOUTS = [
    pytest.param(2, 16, 80, id="b2-g16"),
    pytest.param(3, 48, 96, id="b3-g48"),
    pytest.param(4, -1, 100, id="b4-row"),
    pytest.param(8, 32, 64, id="b8-g32"),
]
OUT_FEATURES = 37
# Gradients: (atol, rtol) per dtype. Weight grads are rounded to the weight's dtype, so one ulp there.
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}
# Products accumulated in another order (GEMV vs a BLAS matmul), relative to the output's magnitude.
MATMUL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture
def device(request):
    name = request.param
    if name == "cpu" and not dispatch.interpreter_enabled():
        pytest.skip("a CUDA device is present, so Triton's CPU interpreter is not enabled in this run")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _triton_backend():
    # Force the kernels on CPU tensors too (the interpreter); "auto" would pick the reference there.
    with kernels.kernel_backend("triton"):
        yield


def _weight(in_features, dtype, device, seed=0, out_features=OUT_FEATURES):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator) * 0.05
    w[3, :] = 0.0  # an all-zero row: the scale floor must keep it finite
    return w.to(device=device, dtype=dtype)


def _assert_close(actual, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def _assert_close_to_scale(actual, expected, tol):
    """As `_assert_close`, with atol relative to the largest |expected|: LSQ scale gradients are sums
    over a group times `1 / sqrt(numel * qmax)`, far below 1, so a fixed atol would accept anything."""
    atol, rtol = tol
    scale = float(expected.abs().max())
    assert scale > 0, "the reference gradient is all zero: the comparison would prove nothing"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "group_size", "in_features"), LAYOUTS)
@pytest.mark.parametrize("grid", ["full", "restricted"])
def test_absmax_scales_bit_exact(device, dtype, bits, group_size, in_features, grid):
    w = _weight(in_features, dtype, device)
    got = kernels.absmax_scales(w, bits, group_size, grid)
    with kernels.kernel_backend("reference"):
        expected = kernels.absmax_scales(w, bits, group_size, grid)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "group_size", "in_features"), LAYOUTS)
@pytest.mark.parametrize(
    "amplitudes",
    [
        pytest.param((), id="ste"),
        pytest.param((0.21,), id="stableqat"),
        pytest.param((0.15, 0.05), id="2terms"),
    ],
)
def test_fake_quantize_matches_reference(device, dtype, bits, group_size, in_features, amplitudes):
    w = _weight(in_features, dtype, device, seed=bits)
    # Learned scales away from absmax, so that some weights clip and the LSQ clip branch is exercised.
    factor = torch.empty(OUT_FEATURES, in_features // (group_size if group_size > 0 else in_features))
    factor.uniform_(0.6, 1.3, generator=torch.Generator().manual_seed(1))
    scales = (quant.absmax_scales(w, bits, group_size) * factor.to(device=device, dtype=dtype)).detach()
    grad_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)

    results = []
    for backend in ("triton", "reference"):
        wi, si = w.clone().requires_grad_(), scales.clone().requires_grad_()
        with kernels.kernel_backend(backend):
            out = kernels.fake_quantize(wi, si, bits, group_size, amplitudes)
            out.backward(grad_out)
        results.append((out.detach(), wi.grad, si.grad))
    (out, dw, ds), (ref_out, ref_dw, ref_ds) = results
    assert torch.equal(out, ref_out)
    _assert_close(dw, ref_dw, GRAD_TOL[dtype])
    _assert_close_to_scale(ds, ref_ds, GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_fake_quantize_reference_row(device):
    """DESIGN's StableQAT row check, through the kernel."""
    w = torch.tensor([[0.4, -0.15, 0.0625, 0.6, -0.55]], device=device, requires_grad=True)
    s = torch.tensor([[0.25]], device=device, requires_grad=True)
    out = kernels.fake_quantize(w, s, bits=3, group_size=-1, surrogate=(0.21,))
    out.backward(torch.tensor([[0.5, -1.0, 1.0, 0.1, -0.3]], device=device))
    assert out.tolist() == [[0.5, -0.25, 0.0, 0.5, -0.5]]
    expected = [0.2762079655, -0.5524159310, 0.2050120375, 0.0552415931, -0.0419159482]
    torch.testing.assert_close(w.grad.cpu(), torch.tensor([expected]), atol=2e-7, rtol=1e-6)
    assert s.grad.item() == pytest.approx(0.0645497224, abs=1e-7)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_detached_scales_and_frozen_weight(device, dtype):
    """Only the requested gradients are produced (absmax scales get none; a frozen weight gets none)."""
    w = _weight(64, dtype, device).requires_grad_()
    scales = kernels.absmax_scales(w, 4, 32)
    kernels.fake_quantize(w, scales, 4, 32).sum().backward()
    # STE with absmax scales: every weight rounds into the range, so d sum / dw is exactly 1.
    assert torch.equal(w.grad, torch.ones_like(w)) and scales.grad is None
    w2 = w.detach()
    learned = scales.clone().requires_grad_()
    kernels.fake_quantize(w2, learned, 4, 32).sum().backward()
    with kernels.kernel_backend("reference"):
        reference = scales.clone().requires_grad_()
        kernels.fake_quantize(w2, reference, 4, 32).sum().backward()
    _assert_close_to_scale(learned.grad, reference.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "group_size", "in_features"), LAYOUTS)
@pytest.mark.parametrize(
    "multiplier", [pytest.param(0.25, id="accumulated"), pytest.param(65536.0 / 3, id="fp16-scaled")]
)
def test_lotion_penalty_grad_matches_reference(device, dtype, bits, group_size, in_features, multiplier):
    w = _weight(in_features, dtype, device, seed=3)
    scales = quant.absmax_scales(w, bits, group_size)
    generator = torch.Generator().manual_seed(4)
    grad = (torch.randn(w.shape, generator=generator) * 1e-3 * multiplier).to(device=device, dtype=dtype)
    curvature = (torch.rand(w.shape, generator=generator) * 1e-2).to(device)
    m = torch.tensor(multiplier, device=device)
    coefficient = 0.5 * 2.0 / (1.0 - 0.9**3)

    ref_grad, ref_value = add_penalty_grad(grad, w, scales, curvature, bits, group_size, coefficient, m)
    got_grad, value = kernels.add_lotion_penalty_grad(
        grad, w, scales, curvature, bits, group_size, coefficient, m
    )
    assert got_grad.dtype == dtype and got_grad.shape == w.shape
    _assert_close(got_grad, ref_grad, GRAD_TOL[dtype])
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_lotion_penalty_grad_reference_values(device):
    """DESIGN's value: s=0.1, w=0.23 -> p=0.3, (1/2) G s (1 - 2p) = 0.04 for G = 2; zero on the grid."""
    w = torch.tensor([[0.23, 0.3, -0.05]], device=device)
    scales = torch.tensor([[0.1]], device=device)
    grad = torch.tensor([[1.0, 1.0, 1.0]], device=device)
    curvature = torch.full_like(w, 2.0)
    out, value = kernels.add_lotion_penalty_grad(
        grad, w, scales, curvature, 4, -1, 0.5, torch.tensor(3.0, device=device)
    )
    # multiplier 3: 1 + 3 * 0.04 for p = 0.3; the grid point 0.3 and p = 0.5 at -0.05 add nothing.
    torch.testing.assert_close(out.cpu(), torch.tensor([[1.12, 1.0, 1.0]]), atol=1e-6, rtol=0)
    # (1/2) * sum G s^2 p (1 - p) = 0.0021 + 0 + 0.0025
    assert value.item() == pytest.approx(0.0046, abs=1e-8)
    assert torch.equal(grad, torch.ones_like(grad))  # not modified in place


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_lotion_penalty_grad_rounds_once_in_low_precision(device, backend):
    """The addition happens in fp32 and is rounded to bf16 once (no intermediate bf16 rounding)."""
    w = torch.tensor([[0.23, 0.37, -0.11, 0.05]], device=device, dtype=torch.bfloat16)
    scales = torch.tensor([[0.1]], device=device, dtype=torch.bfloat16)
    grad = torch.tensor([[1.0, -1.0, 0.5, 2.0]], device=device, dtype=torch.bfloat16)
    curvature = torch.full(w.shape, 0.0123, device=device)
    m = torch.tensor(0.37, device=device)
    with kernels.kernel_backend(backend):
        out, _ = kernels.add_lotion_penalty_grad(grad, w, scales, curvature, 4, -1, 0.5, m)
    v = (w.float() / scales.float()).clamp(-8, 7)
    p = v - v.floor()
    exact = grad.float() + 0.37 * 0.5 * 0.0123 * torch.where(p > 0, scales.float() * (1 - 2 * p), 0.0)
    assert torch.equal(out, exact.to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_lotion_penalty_grad_propagates_nan(device):
    w = torch.tensor([[0.23, float("nan"), 0.1, 0.2]], device=device)
    scales = torch.tensor([[0.1]], device=device)
    out, value = kernels.add_lotion_penalty_grad(
        torch.zeros_like(w), w, scales, torch.ones_like(w), 4, -1, 0.5, torch.tensor(1.0, device=device)
    )
    ref, ref_value = add_penalty_grad(torch.zeros_like(w), w, scales, torch.ones_like(w), 4, -1, 0.5, 1.0)
    assert torch.equal(out.isnan(), ref.isnan()) and value.isnan() and ref_value.isnan()


NON_FINITE = [
    pytest.param({(1, 3): float("nan")}, id="nan"),
    pytest.param({(2, 5): float("inf")}, id="inf"),
    pytest.param({(4, 7): float("-inf")}, id="neg-inf"),
    pytest.param({(1, 3): float("nan"), (2, 5): float("inf")}, id="nan-and-inf"),
]


def _same_values(actual, expected):
    """Equal NaN/inf pattern and equal finite values: a kernel must not turn NaN or inf into numbers."""
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite].float(), expected[finite].float(), atol=1e-6, rtol=1e-5)
    assert torch.equal(actual[actual.isinf()], expected[expected.isinf()])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("scales_from", ["absmax", "finite-scales"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_non_finite_weights_propagate_like_the_reference(device, dtype, bad, scales_from):
    """NaN/inf weights give the reference's NaN/inf scales, outputs and gradients, never finite numbers."""
    w = _weight(32, dtype, device, seed=9, out_features=6)
    finite_scales = quant.absmax_scales(w, 4, 16)
    for index, value in bad.items():
        w[index] = value
    grad_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    results = []
    for backend in ("triton", "reference"):
        with kernels.kernel_backend(backend):
            scales = kernels.absmax_scales(w, 4, 16) if scales_from == "absmax" else finite_scales
            wi, si = w.clone().requires_grad_(), scales.clone().requires_grad_()
            out = kernels.fake_quantize(wi, si, 4, 16, (0.21,))
            out.backward(grad_out)
        results.append((scales, out.detach(), wi.grad, si.grad))
    if scales_from == "absmax" and "nan" in str(bad):
        assert results[1][0].isnan().all()  # the reference: one NaN makes the tensor-wide scale floor NaN
    for actual, expected in zip(*results, strict=True):
        _same_values(actual, expected)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("amplitudes", [pytest.param((), id="ste"), pytest.param((0.21,), id="stableqat")])
def test_both_extremes_of_a_group_train_under_the_full_grid(device, dtype, bits, amplitudes):
    """The full grid puts a group's largest positive weight at `qmax + 1/2`: it gets a gradient, as the
    largest negative one does (masking on `v <= qmax` froze it). A weight clipped by a smaller scale does not."""
    w = torch.tensor([[0.9, -0.3, 0.1, 0.2], [-0.9, 0.3, -0.1, 0.05]], device=device, dtype=dtype)
    scales = kernels.absmax_scales(w, bits, -1, "full")
    clipped_scales = scales * 0.5  # now |v| = 2 qmax + 1: clipped, no gradient
    for s, expected_extreme in ((scales, True), (clipped_scales, False)):
        wi = w.clone().requires_grad_()
        kernels.fake_quantize(wi, s, bits, -1, amplitudes).backward(torch.ones_like(w))
        extremes = wi.grad[:, 0]
        assert bool((extremes != 0).all()) is expected_extreme, (s, wi.grad)
        if expected_extreme and not amplitudes:
            assert torch.equal(extremes, torch.ones_like(extremes))  # straight through at both signs


def _packed_layer(bits, group_size, in_features, dtype, device, out_features=OUT_FEATURES):
    linear = torch.nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(_weight(in_features, dtype, "cpu", seed=bits, out_features=out_features))
    qat = LotionLinear.from_linear(linear, QuantSpec(bits=bits, group_size=group_size)).eval()
    return PackedLinear.from_qat(qat).to(device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("bits", "group_size", "in_features"), [*LAYOUTS, pytest.param(4, 32, 160, id="b4-g32")]
)
def test_dequantize_packed_bit_exact(device, dtype, bits, group_size, in_features):
    layer = _packed_layer(bits, group_size, in_features, dtype, device)
    got = kernels.dequantize_packed(layer.weight, layer.weight_scale, bits, group_size, in_features)
    with kernels.kernel_backend("reference"):
        expected = layer.dequantized_weight()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("bits", "group_size", "in_features"),
    [*LAYOUTS, pytest.param(4, 128, 384, id="b4-g128"), pytest.param(2, -1, 256, id="b2-row256")],
)
@pytest.mark.parametrize(
    "rows", [pytest.param(1, id="M1"), pytest.param(5, id="M5"), pytest.param(13, id="M13")]
)
def test_packed_linear_matches_reference(device, dtype, bits, group_size, in_features, rows):
    layer = _packed_layer(bits, group_size, in_features, dtype, device)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(
        device=device, dtype=dtype
    )
    got = layer(x)
    with kernels.kernel_backend("reference"):
        expected = layer(x)
    if rows > kernels.packed_matmul.GEMV_MAX_M or bits == 3:
        assert torch.equal(got, expected)  # dequantize + the same F.linear
    else:
        atol, rtol = MATMUL_TOL[dtype]
        torch.testing.assert_close(got, expected, atol=atol * expected.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_packed_linear_batched_input_and_input_gradient(device):
    layer = _packed_layer(4, 32, 64, torch.float32, device)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, OUT_FEATURES)
    y.square().sum().backward()
    with kernels.kernel_backend("reference"):
        x_ref = x.detach().clone().requires_grad_()
        y_ref = layer(x_ref)
        y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_lotion_linear_trains_on_kernels_like_the_reference(device):
    """A whole layer: StableQAT forward/backward with learned scales on the kernels vs the reference."""
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 21).to(device)
    spec = QuantSpec(bits=3, group_size=48)
    x = torch.randn(5, 96, device=device)
    grads = []
    for backend in ("triton", "reference"):
        layer = LotionLinear.from_linear(torch.nn.Linear(96, 21).to(device), spec, "stableqat")
        layer.load_state_dict(
            {**base.state_dict(), "weight_scale": layer.weight_scale.detach()}, strict=False
        )
        layer.reset_scales()
        with kernels.kernel_backend(backend):
            out = layer(x)
            out.square().mean().backward()
            eval_out = layer.eval()(x)
        grads.append((out.detach(), eval_out.detach(), layer.weight.grad, layer.weight_scale.grad))
    (out, eval_out, dw, ds), (ref_out, ref_eval, ref_dw, ref_ds) = grads
    assert torch.equal(out, ref_out) and torch.equal(eval_out, ref_eval)
    torch.testing.assert_close(dw, ref_dw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ds, ref_ds, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_fake_quantize_under_torch_compile(device):
    """The custom op's fake implementation lets torch.compile trace through it (no graph break on Triton)."""
    w = _weight(64, torch.float32, device).requires_grad_()
    scales = kernels.absmax_scales(w, 4, 32).requires_grad_()

    def step(weight, s):
        return (kernels.fake_quantize(weight, s, 4, 32, (0.21,)) * 2.0).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    value = compiled(w, scales)
    value.backward()
    dw, ds = w.grad.clone(), scales.grad.clone()
    w.grad = scales.grad = None
    step(w, scales).backward()
    assert value.item() == pytest.approx(step(w, scales).item())
    assert torch.equal(dw, w.grad) and torch.equal(ds, scales.grad)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_custom_ops_pass_opcheck(device):
    """torch.library.opcheck: schemas, fake implementations and autograd registrations are consistent."""
    from hf_lotion.kernels import fake_quant, packed_matmul

    w = _weight(64, torch.float32, device).requires_grad_()
    scales = kernels.absmax_scales(w, 4, 32).requires_grad_()
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(fake_quant.fake_quantize_op, (w, scales, 4, 32, [0.21]), test_utils=tests)
    torch.library.opcheck(fake_quant.fake_quantize_op, (w, scales, 4, 32, []), test_utils=tests)
    layer = _packed_layer(4, 32, 64, torch.float32, device)
    x = torch.randn(2, 64, device=device, requires_grad=True)
    args = (x, layer.weight, layer.weight_scale, layer.bias, 4, 32, 64)
    torch.library.opcheck(packed_matmul.packed_linear, args, test_utils=tests)


def test_dispatch_picks_reference_on_cpu_in_auto_mode_and_validates_the_variable(monkeypatch):
    w = torch.randn(4, 32)
    with kernels.kernel_backend("auto"):
        assert not kernels.use_triton(w)  # CPU tensors: the reference, even with the interpreter on
    with kernels.kernel_backend("reference"):
        assert not kernels.use_triton(w)
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(
        ValueError, match="HF_LOTION_KERNELS='fast' is not supported; allowed: auto, reference, triton"
    ):
        kernels.use_triton(w)
    with pytest.raises(ValueError, match="backend='gpu' is not supported"):
        kernels.kernel_backend("gpu").__enter__()


def test_auto_keeps_cuda_on_the_reference_until_the_kernels_are_verified_on_a_gpu(monkeypatch):
    """No GPU run of the kernels has passed yet: `auto` must not pick them on CUDA; `triton` opts in."""
    cuda_tensor = type("CudaTensor", (), {"device": torch.device("cuda", 0)})()  # only .device is read
    monkeypatch.setattr(dispatch, "triton_can_run", lambda device: True)
    assert dispatch.KERNELS_VERIFIED_ON_GPU is False  # flip it (and this line) after the recorded GPU run
    with kernels.kernel_backend("auto"):
        assert not kernels.use_triton(cuda_tensor)
        monkeypatch.setattr(dispatch, "KERNELS_VERIFIED_ON_GPU", True)
        assert kernels.use_triton(cuda_tensor)
    monkeypatch.setattr(dispatch, "KERNELS_VERIFIED_ON_GPU", False)
    with kernels.kernel_backend("triton"):
        assert kernels.use_triton(cuda_tensor)


def test_forcing_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.kernel_backend("triton"), pytest.raises(ValueError, match="Triton cannot run on cpu"):
        kernels.fake_quantize(torch.randn(4, 32), torch.ones(4, 1), 4, 32)


def test_float64_always_takes_the_reference():
    w = torch.randn(5, 32, dtype=torch.float64)
    s = quant.absmax_scales(w, 4, 32)
    with kernels.kernel_backend("triton"):
        assert torch.equal(kernels.fake_quantize(w, s, 4, 32), quant.fake_quantize(w, s, 4, 32))


def test_kernel_backend_restores_the_previous_setting(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    with kernels.kernel_backend("auto"):
        assert dispatch.requested_backend() == "auto"
    assert dispatch.requested_backend() == "reference"


def test_fake_quantize_forward_on_a_plain_layer_is_f_linear_of_the_rtn_weight():
    """Sanity: eval forward through the kernels is F.linear of the reference RTN weight, bit for bit."""
    if not dispatch.interpreter_enabled():
        pytest.skip("runs on CPU tensors through the interpreter")
    layer = LotionLinear.from_linear(torch.nn.Linear(48, 7), QuantSpec(bits=4, group_size=16)).eval()
    x = torch.randn(3, 48)
    out = layer(x)
    with kernels.kernel_backend("reference"):
        assert torch.equal(out, F.linear(x, layer.deploy_weight(), layer.bias))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_lotion_training_on_kernels_matches_the_reference_over_steps(device):
    """In-graph LOTION (penalty node, curvature hook) over three optimizer steps: kernels vs reference."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_lotion
    from hf_lotion import LotionConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4
    )
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0)).to(device)
    runs = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(device)
        hf_lotion.prepare(model, LotionConfig(bits=2, group_size=32, lotion_lambda=50.0, curvature_every=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        runtime = hf_lotion.penalty_runtime(model)
        values, grads = [], []
        with kernels.kernel_backend(backend):
            for _ in range(3):
                model(input_ids=ids, labels=ids).loss.backward()
                grads.append({n: layer.weight.grad.clone() for n, layer in hf_lotion.lotion_layers(model)})
                optimizer.step()
                optimizer.zero_grad()
                values.append(runtime.pop_penalty())
        runs.append((values, grads, runtime.ema, runtime.updates))
    (values, grads, ema, updates), (ref_values, ref_grads, ref_ema, ref_updates) = runs
    assert updates == ref_updates == 3
    assert values == pytest.approx(ref_values, rel=1e-4)
    for step_grads, step_ref in zip(grads, ref_grads, strict=True):
        for name, grad in step_grads.items():
            torch.testing.assert_close(grad, step_ref[name], atol=1e-7, rtol=1e-4)
    for name, state in ema.items():
        torch.testing.assert_close(state, ref_ema[name], atol=1e-9, rtol=1e-4)


@pytest.mark.slow
def test_kernel_benchmark_script_runs_end_to_end(tmp_path):
    """`benchmarks/triton_kernels.py --smoke` (tiny shapes) exercises every section, so the GPU run is ready to go."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_kernels.py"
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sections = {json.loads(line)["section"].split(" ")[0] for line in out.read_text().splitlines()}
    assert sections == {"bandwidth", "fake_quant", "LOTION", "packed", "QAT"}
    assert "| stableqat |" in result.stdout


def test_cli_env_reports_the_kernel_path_and_rejects_a_bad_setting(capsys, monkeypatch):
    from hf_lotion.cli import main

    assert main(["env"]) == 0
    assert "kernels" in capsys.readouterr().out
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    assert main(["env"]) == 2
    assert (
        "HF_LOTION_KERNELS='fast' is not supported; allowed: auto, reference, triton"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "module",
    [
        "hf_lotion.quant.grid",
        "hf_lotion.quant.fake_quant",
        "hf_lotion.quant.lotion",
        "hf_lotion.quant.packing",
        "hf_lotion.kernels",
        "hf_lotion.kernels.dispatch",
    ],
)
def test_docstring_examples_run(module):
    """The examples in the math and kernel docstrings are real (run on the reference path)."""
    import doctest
    import importlib

    with kernels.kernel_backend("auto"):
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
