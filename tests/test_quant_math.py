"""Quantization math against DESIGN section 3's reference values and hand-written/finite-difference references."""

from __future__ import annotations

import math

import pytest
import torch

from hf_lotion.quant import (
    absmax_scales,
    dequantize,
    fake_quantize,
    fake_quantize_rtn,
    int_range,
    lotion_penalty,
    lotion_penalty_grad,
    lotion_regularizer,
    lsq_gradient_scale,
    quantize_rtn,
    rounding_variance,
    scale_divisor,
    stableqat_surrogate,
    ste_fake_quantize,
)

F64 = torch.float64
ATOL = 1e-6

# ---------------------------------------------------------------- grids and RTN


@pytest.mark.parametrize("bits,expected", [(2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (8, (-128, 127))])
def test_int_range(bits, expected):
    assert int_range(bits) == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_restricted_grid_uses_symmetric_levels_full_grid_reaches_all(bits):
    w = torch.linspace(-1, 1, 4001, dtype=F64).reshape(1, -1)
    qmin, qmax = int_range(bits)
    restricted = quantize_rtn(w, absmax_scales(w, bits, -1, "restricted"), bits, -1).unique()
    full = quantize_rtn(w, absmax_scales(w, bits, -1, "full"), bits, -1).unique()
    assert restricted.tolist() == list(range(qmin + 1, qmax + 1))  # 2**b - 1 levels
    assert full.tolist() == list(range(qmin, qmax + 1))  # all 2**b levels


def test_absmax_scale_reference_int4_block():
    w = torch.tensor([[1.75, -0.875, 0.25, -0.125]], dtype=F64)
    assert absmax_scales(w, 4, 4, "restricted").item() == 0.25
    assert absmax_scales(w, 4, 4, "full").item() == pytest.approx(1.75 / 7.5, abs=1e-15)
    assert scale_divisor(2, "restricted") == 1.0 and scale_divisor(2, "full") == 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_all_zero_group_gets_positive_scale_and_zero_weights(dtype):
    w = torch.zeros(3, 8, dtype=dtype)
    w[0, 4:] = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=dtype)
    s = absmax_scales(w, 4, 4)
    assert (s > 0).all() and s.dtype == dtype
    w_hat = fake_quantize_rtn(w, s, 4, 4)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[1:], torch.zeros_like(w_hat[1:]))
    assert torch.equal(
        fake_quantize_rtn(
            torch.zeros(2, 4, dtype=dtype), absmax_scales(torch.zeros(2, 4), 4, -1, dtype=dtype), 4, -1
        ),
        torch.zeros(2, 4, dtype=dtype),
    )


def test_rtn_rounds_half_to_even():
    s = torch.ones(1, 1, dtype=F64)
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5]], dtype=F64)
    assert quantize_rtn(w, s, 4, -1).tolist() == [[0, 2, 2, 0, -2, -2, 4, -4]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("group_size", [8, 32, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rtn_roundtrip_is_exact_and_levels_in_range(bits, group_size, dtype):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    w = (torch.randn(5, 64, generator=gen) * torch.rand(5, 64, generator=gen) * 3).to(dtype)
    s = absmax_scales(w, bits, group_size)
    q = quantize_rtn(w, s, bits, group_size)
    qmin, qmax = int_range(bits)
    assert q.dtype == torch.int8 and q.min() >= qmin and q.max() <= qmax
    w_hat = dequantize(q, s, group_size, dtype)
    assert w_hat.dtype == dtype
    # Re-quantizing the dequantized weight with the same scales gives the same integers, bit for bit.
    assert torch.equal(quantize_rtn(w_hat, s, bits, group_size), q)
    # Every dequantized value is an exact scale multiple, computed once in float32.
    per_elem_scale = s.float().repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    assert torch.equal(w_hat, (q.float() * per_elem_scale).to(dtype))
    # RTN is the nearest level inside the range (up to the final rounding of s * q to `dtype`).
    err = (w.float() - w_hat.float()).abs()
    inside = (w.float() / per_elem_scale).abs() <= qmax
    bound = per_elem_scale * 0.5 * (1 + 1e-6) + w_hat.float().abs() * torch.finfo(dtype).eps
    assert (err[inside] <= bound[inside]).all()


# ---------------------------------------------------------------- StableQAT surrogate and autograd

SURROGATE_REFERENCE = {
    0.0: 0.0346582490,
    0.10: 0.0596919823,
    0.25: 0.2050120375,
    0.40: 0.5524159310,
    -0.75: 0.2050120375,
    1.10: 0.0596919823,
}


@pytest.mark.parametrize("v,expected", list(SURROGATE_REFERENCE.items()), ids=lambda x: f"{x}")
def test_surrogate_reference_values(v, expected):
    assert stableqat_surrogate(torch.tensor([v], dtype=F64), [0.21]).item() == pytest.approx(
        expected, abs=ATOL
    )


def test_surrogate_shape():
    r = torch.linspace(-0.5, 0.5, 101, dtype=F64)
    g = stableqat_surrogate(r, [0.21])
    assert g[0].item() == pytest.approx(1.0, abs=1e-12) and g[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert (g > 0).all() and (g <= 1 + 1e-12).all()
    # g depends only on the distance to the nearest integer.
    assert torch.allclose(stableqat_surrogate(r + 3, [0.21]), g, atol=1e-12)
    assert torch.allclose(stableqat_surrogate(-r, [0.21]), g, atol=1e-12)
    assert torch.equal(stableqat_surrogate(r, []), torch.ones_like(r))
    assert torch.equal(stableqat_surrogate(r, [0.0]), torch.ones_like(r))


def test_stableqat_row_check_reference():
    w = torch.tensor([[0.4, -0.15, 0.0625, 0.6, -0.55]], dtype=F64, requires_grad=True)
    s = torch.tensor([[0.25]], dtype=F64, requires_grad=True)
    out = fake_quantize(w, s, bits=3, group_size=-1, surrogate=[0.21])
    out.backward(torch.tensor([[0.5, -1.0, 1.0, 0.1, -0.3]], dtype=F64))
    assert out.tolist() == [[0.5, -0.25, 0.0, 0.5, -0.5]]
    expected = [0.2762079655, -0.5524159310, 0.2050120375, 0.0552415931, -0.0419159482]
    assert torch.allclose(w.grad, torch.tensor([expected], dtype=F64), atol=ATOL, rtol=0)
    assert s.grad.item() == pytest.approx(0.0645497224, abs=ATOL)


def reference_fake_quant_grads(w, s, grad_out, bits, group_size, amplitudes):
    """Element-by-element reference of the STE/StableQAT weight gradient and the LSQ scale gradient."""
    qmin, qmax = int_range(bits)
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    gw = torch.zeros(rows, cols, dtype=F64)
    gs = torch.zeros(s.shape, dtype=F64)
    factor = 1.0 / math.sqrt(w.numel() * qmax)
    for i in range(rows):
        for j in range(cols):
            scale = float(s[i, j // size])
            v = float(w[i, j]) / scale
            q = float(torch.round(torch.tensor(v, dtype=F64)))
            inside = qmin - 0.5 <= v <= qmax + 0.5  # v rounds into the range
            series = sum(a * math.cos((2 * k + 1) * math.pi * (v + q)) for k, a in enumerate(amplitudes))
            c = math.sqrt(2) * math.pi * series
            g = (1 - c) / (1 + c)
            gw[i, j] = float(grad_out[i, j]) * g if inside else 0.0
            level = min(max(q, qmin), qmax)
            dq_ds = (level - v) if qmin <= v <= qmax else level  # LSQ's rule, on the unrounded range
            gs[i, j // size] += float(grad_out[i, j]) * dq_ds * factor
    return gw, gs


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("group_size", [4, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("amplitudes", [(), (0.21,), (0.15, 0.05)], ids=["ste", "stableqat", "stableqat2"])
def test_fake_quant_backward_matches_elementwise_reference(bits, group_size, amplitudes):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(3, 12, generator=gen, dtype=F64)
    s = absmax_scales(w, bits, group_size, "full") * 0.8  # some weights fall outside the range
    w.requires_grad_(True)
    s = s.clone().requires_grad_(True)
    grad_out = torch.randn(3, 12, generator=gen, dtype=F64)
    fake_quantize(w, s, bits, group_size, amplitudes).backward(grad_out)
    gw, gs = reference_fake_quant_grads(w.detach(), s.detach(), grad_out, bits, group_size, amplitudes)
    assert torch.allclose(w.grad, gw, atol=1e-12, rtol=0)
    assert torch.allclose(s.grad, gs, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)], ids=str
)
def test_fake_quant_low_precision_matches_float64(dtype, atol):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(4, 32, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    s = absmax_scales(w, 4, 8).requires_grad_(True)
    v = w.detach().to(F64) / s.detach().to(F64).repeat_interleave(8, dim=1)
    # At rounding ties float32 and float64 may pick different levels (each group's absmax element sits
    # exactly at +-7.5 on the full grid); give those elements no upstream gradient.
    clear = ((v - torch.round(v)).abs() - 0.5).abs() > 1e-4
    # The absmax elements (|v| about 7.5) sit at the window's edge, which each precision draws in its own ulps.
    clear &= v.abs() < 7.4
    assert clear.float().mean() > 0.8
    grad_out = (torch.randn(4, 32, generator=gen, dtype=F64) * clear).to(dtype)
    out = fake_quantize(w, s, 4, 8, (0.21,))
    out.backward(grad_out)
    assert out.dtype == dtype and w.grad.dtype == dtype and s.grad.dtype == dtype
    # The forward is the deploy weight of the same precision, bit for bit.
    assert torch.equal(out, fake_quantize_rtn(w.detach(), s.detach(), 4, 8))

    w_ref = w.detach().to(F64).requires_grad_(True)
    s_ref = s.detach().to(F64).requires_grad_(True)
    fake_quantize(w_ref, s_ref, 4, 8, (0.21,)).backward(grad_out.to(F64))
    assert torch.allclose(w.grad.to(F64), w_ref.grad, atol=atol, rtol=atol)
    assert torch.allclose(s.grad.to(F64), s_ref.grad, atol=atol, rtol=atol)


def test_ste_is_stableqat_with_no_or_zero_amplitudes():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 16, generator=gen)
    s = absmax_scales(w, 3, 8) * 0.7
    grads = []
    for amps in [(), (0.0,)]:
        wi = w.clone().requires_grad_(True)
        ste_fake_quantize(wi, s, 3, 8).sum().backward() if not amps else fake_quantize(
            wi, s, 3, 8, amps
        ).sum().backward()
        grads.append(wi.grad)
    assert torch.equal(grads[0], grads[1])
    v = w / s.repeat_interleave(8, dim=1)
    assert torch.equal(grads[0], ((v >= -4.5) & (v <= 3.5)).float())  # STE: 1 where v rounds into the range


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_ste_gradient_window_is_where_v_rounds_into_the_range(dtype):
    """1 for `qmin - 1/2 <= v <= qmax + 1/2` (both edges included, widened by the scale's rounding), 0 beyond."""
    s = torch.ones(1, 1, dtype=dtype)
    w = torch.tensor([[-4.5, 3.5, -4.0, 3.0, 3.4, -4.625, 3.625, 7.0]], dtype=dtype, requires_grad=True)
    ste_fake_quantize(w, s, 3, -1).sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_both_signs_of_the_absmax_train_under_the_full_grid(dtype, bits):
    """Each group's largest |w| lands at `qmax + 1/2` (positive) or `qmin + 1/2` (negative): both get the
    straight-through gradient, whichever way the scale's rounding in `dtype` falls."""
    gen = torch.Generator().manual_seed(bits)
    w = (torch.randn(64, 32, generator=gen) * 0.05).to(dtype)
    w[:32, 0] = w[:32].abs().amax(dim=1) * 1.5  # the group's extreme is positive in half the rows...
    w[32:, 0] = -w[32:].abs().amax(dim=1) * 1.5  # ...and negative in the other half
    w.requires_grad_(True)
    ste_fake_quantize(w, absmax_scales(w, bits, -1, "full"), bits, -1).sum().backward()
    assert torch.equal(w.grad[:, 0], torch.ones(64, dtype=dtype))


def test_absmax_scales_get_no_gradient():
    """The absmax scale is a constant in the backward: the weight gradient is exactly the surrogate's,
    with no term through `s(w)` (which would move the group's absmax element by `d s / d w`)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(2, 8, generator=gen, dtype=F64, requires_grad=True)
    scales = absmax_scales(w, 4, 4)
    assert not scales.requires_grad and scales.grad_fn is None
    grad_out = torch.randn(2, 8, generator=gen, dtype=F64)
    fake_quantize(w, scales, 4, 4, (0.21,)).backward(grad_out)
    v = w.detach() / scales.repeat_interleave(4, dim=1)
    expected = grad_out * stableqat_surrogate(v, (0.21,))  # every v is inside the window here
    assert torch.allclose(w.grad, expected, atol=1e-15, rtol=0)


def test_lsq_gradient_scale():
    assert lsq_gradient_scale(5, 3) == pytest.approx(1 / math.sqrt(15))


# ---------------------------------------------------------------- randomized rounding and LOTION


def rounding_split(v: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(floor, p)` of `v` clamped to the range: randomized rounding gives `floor + 1` with probability `p`."""
    v = v.clamp(qmin, qmax)
    return torch.floor(v), v - torch.floor(v)


def test_rounding_variance_reference():
    w = torch.tensor([[0.23]], dtype=F64)
    s = torch.tensor([[0.1]], dtype=F64)
    _, p = rounding_split(w / s, -8, 7)
    assert p.item() == pytest.approx(0.3, abs=ATOL)
    assert rounding_variance(w, s, 4, -1).item() == pytest.approx(0.0021, abs=ATOL)
    # d sigma^2 / dw = s (1 - 2p) = 0.04 (lambda = 2, G = 1 makes the regulariser gradient exactly that)
    assert lotion_penalty_grad(w, s, torch.ones_like(w), 4, -1, strength=2.0).item() == pytest.approx(
        0.04, abs=ATOL
    )


def test_rounding_variance_reference_int4_block():
    w = torch.tensor([[1.75, -0.875, 0.25, -0.125]], dtype=F64)
    s = absmax_scales(w, 4, 4, "restricted")
    assert s.item() == 0.25
    _, p = rounding_split(w / s, -8, 7)
    assert p.tolist() == [[0.0, 0.5, 0.0, 0.5]]
    assert rounding_variance(w, s, 4, 4).tolist() == [[0.0, 0.015625, 0.0, 0.015625]]


def exact_rr_expectation(loss, w: float, s: float, qmin: int = -8, qmax: int = 7) -> float:
    lower, p = rounding_split(torch.tensor(w / s, dtype=F64), qmin, qmax)
    return (1 - p.item()) * loss(lower.item() * s) + p.item() * loss((lower.item() + 1) * s)


def test_quadratic_smoothed_loss_reference():
    loss = lambda x: 2 * (x - 0.26) ** 2  # noqa: E731
    w, s = 0.23, 0.1
    expected = exact_rr_expectation(loss, w, s)
    assert expected == pytest.approx(0.006, abs=ATOL)
    # For a quadratic, E[L(RR(w))] = L(w) + (1/2) L'' sigma^2 exactly (L'' = 4).
    wt, st = torch.tensor([[w]], dtype=F64), torch.tensor([[s]], dtype=F64)
    penalty = lotion_penalty(wt, st, torch.full_like(wt, 4.0), 4, -1, strength=1.0).item()
    assert loss(w) + penalty == pytest.approx(expected, abs=1e-12)
    assert exact_rr_expectation(loss, 0.26, s) == pytest.approx(0.0048, abs=ATOL)
    assert exact_rr_expectation(loss, 0.3, s) == pytest.approx(0.0032, abs=ATOL)


def test_penalty_gradient_matches_finite_differences_off_grid():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(4, 16, generator=gen, dtype=F64)
    s = absmax_scales(w, 3, 8)
    curvature = torch.rand(4, 16, generator=gen, dtype=F64)
    _, p = rounding_split(w / s.repeat_interleave(8, dim=1), -4, 3)
    off_grid = (p > 1e-3) & (p < 1 - 1e-3)
    eps = 1e-7
    analytic = lotion_penalty_grad(w, s, curvature, 3, 8, strength=0.7)
    for idx in off_grid.nonzero()[:20]:
        i, j = idx.tolist()
        wp, wm = w.clone(), w.clone()
        wp[i, j] += eps
        wm[i, j] -= eps
        fd = (lotion_penalty(wp, s, curvature, 3, 8, 0.7) - lotion_penalty(wm, s, curvature, 3, 8, 0.7)) / (
            2 * eps
        )
        assert analytic[i, j].item() == pytest.approx(fd.item(), abs=1e-7)


def test_penalty_gradient_is_zero_on_grid_and_outside_range():
    s = torch.tensor([[0.5]], dtype=F64)
    w = torch.tensor(
        [[1.0, -1.5, 3.5, 10.0, -10.0, 0.25]], dtype=F64
    )  # grid, grid, top level, clipped x2, mid
    grad = lotion_penalty_grad(w, s, torch.ones_like(w), 3, -1)
    assert grad[0, :5].tolist() == [0.0] * 5
    assert grad[0, 5].item() == pytest.approx(
        0.5 * 0.5 * (1 - 2 * 0.5), abs=1e-12
    )  # p = 0.5: top of the bump
    assert rounding_variance(w, s, 3, -1)[0, :5].tolist() == [0.0] * 5


def test_regularizer_gradient_is_rounded_once_in_low_precision():
    """bf16 weights: `grad_output * (lambda/2) G s (1 - 2p)` is formed in float32 and rounded to bf16 once."""
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(64, 64, generator=gen) * 0.05).to(torch.bfloat16)
    s = absmax_scales(w, 4, 32)
    curvature = torch.rand(64, 64, generator=gen) * 3.0
    wr = w.clone().requires_grad_(True)
    (lotion_regularizer(wr, s, curvature, 4, 32, strength=0.7) * 0.37).backward()
    v = (w.float() / s.float().repeat_interleave(32, dim=1)).clamp(-8, 7)
    p = v - v.floor()
    slope = torch.where(p > 0, s.float().repeat_interleave(32, dim=1) * (1 - 2 * p), 0.0)
    exact = (0.35 * curvature * slope) * 0.37
    assert torch.equal(wr.grad, exact.to(torch.bfloat16))


def test_regularizer_autograd_uses_the_penalty_gradient():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 8, generator=gen, dtype=F64)
    s = absmax_scales(w, 4, -1)
    curvature = torch.rand(3, 8, generator=gen, dtype=F64)
    wr = w.clone().requires_grad_(True)
    value = lotion_regularizer(wr, s, curvature, 4, -1, strength=1.5)
    value.backward()
    assert value.item() == pytest.approx(lotion_penalty(w, s, curvature, 4, -1, 1.5).item(), abs=1e-15)
    assert torch.equal(wr.grad, lotion_penalty_grad(w, s, curvature, 4, -1, 1.5))
