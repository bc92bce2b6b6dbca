"""LotionLinear: the train/eval invariant, method forwards, learned scales, and prepare() on plain modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_lotion
from hf_lotion import LotionLinear, QuantSpec
from hf_lotion.quant import absmax_scales, dequantize, fake_quantize_rtn

METHODS = ["lotion", "stableqat", "ste", "full_precision"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_layer(method="ste", bits=4, group_size=16, dtype=torch.float32, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    linear = nn.Linear(48, 10, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) * 4)
    method = hf_lotion.methods.build_method(method, **kw)
    return LotionLinear.from_linear(linear, QuantSpec(bits=bits, group_size=group_size), method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 48), (4, -1), (8, 8)], ids=lambda x: str(x))
def test_eval_mode_is_rtn_deploy_weight_bit_exact(method, dtype, bits, group_size):
    layer = make_layer(method, bits, group_size, dtype).eval()
    x = torch.randn(3, 5, 48).to(dtype)
    q, scales = layer.quantize_weight()
    deploy = dequantize(q, scales, group_size, dtype)
    assert torch.equal(layer.deploy_weight(), deploy)
    assert torch.equal(layer(x), F.linear(x, deploy, layer.bias))
    if not layer.method.learned_scales:
        assert torch.equal(scales, absmax_scales(layer.weight, bits, group_size, layer.spec.grid))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_forward_per_method(dtype):
    x = torch.randn(4, 48).to(dtype)
    for method in METHODS:
        layer = make_layer(method, dtype=dtype).train()
        out = layer(x)
        if method in ("lotion", "full_precision"):  # latent weights
            assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
            assert not torch.equal(out, layer.eval()(x))
        else:  # fake-quantized: same values as eval, different backward
            assert torch.equal(out, F.linear(x, layer.deploy_weight(), layer.bias))


def test_backward_differs_by_method_and_learned_scales_train():
    x = torch.randn(8, 48)
    grads = {}
    for method in ["ste", "stableqat", "lotion"]:
        layer = make_layer(method).train()
        layer(x).pow(2).sum().backward()
        grads[method] = layer.weight.grad.clone()
        if method == "stableqat":
            assert layer.weight_scale is not None and layer.weight_scale.grad is not None
            assert layer.weight_scale.grad.abs().sum() > 0
    assert not torch.allclose(grads["ste"], grads["stableqat"])
    assert not torch.allclose(grads["ste"], grads["lotion"])
    # StableQAT damps the straight-through gradient: |g| <= 1 elementwise.
    assert (grads["stableqat"].abs() <= grads["ste"].abs() * (1 + 1e-5)).all()


def test_learned_scales_start_at_absmax_and_stay_positive():
    layer = make_layer("stableqat")
    assert layer.method.learned_scales
    assert torch.equal(layer.weight_scale.detach(), absmax_scales(layer.weight, 4, 16, layer.spec.grid))
    with torch.no_grad():
        layer.weight_scale.fill_(-1.0)
    assert (layer.quant_scales() > 0).all()
    assert torch.isfinite(layer.eval()(torch.randn(2, 48))).all()


def test_from_linear_shares_parameters_and_keeps_mode():
    linear = nn.Linear(32, 4).eval()
    layer = LotionLinear.from_linear(linear, QuantSpec(group_size=8))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.training
    assert "bits=4, group_size=8, grid=full, method=lotion(lotion_lambda=1.0" in repr(layer)


def test_constructor_rejects_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=48"):
        LotionLinear(48, 4, spec=QuantSpec(group_size=32))


def test_eval_mode_gradient_is_straight_through():
    layer = make_layer("lotion").eval()
    x = torch.randn(4, 48, requires_grad=True)
    layer(x).sum().backward()
    # Through round-to-nearest as the identity (every weight rounds into the range under absmax scales):
    # d sum(x W_hat^T) / dW = 1 x^T summed over the batch; d / dx = the deploy weight's column sums.
    expected_weight_grad = x.detach().sum(dim=0).expand(layer.out_features, -1)
    torch.testing.assert_close(layer.weight.grad, expected_weight_grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, layer.deploy_weight().sum(dim=0).expand(4, -1), rtol=1e-6, atol=1e-6)


def test_prepare_plain_module_and_quantized_equals_fake_quant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(5, 32)
    reference = [
        fake_quantize_rtn(m.weight, absmax_scales(m.weight, 3, 16, "full"), 3, 16) for m in model[::2]
    ]
    hf_lotion.prepare(model, hf_lotion.LotionConfig(bits=3, group_size=16, method="ste"))
    assert all(isinstance(m, LotionLinear) for m in model[::2])
    model.eval()
    expected = F.linear(F.gelu(F.linear(x, reference[0], model[0].bias)), reference[1], model[2].bias)
    assert torch.equal(model(x), expected)


def test_prepare_validates_before_swapping_anything():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"group_size=16 does not divide in_features=8 of layer '2'"):
        hf_lotion.prepare(model, hf_lotion.LotionConfig(group_size=16))
    assert not any(isinstance(m, LotionLinear) for m in model.modules())

    with torch.no_grad():
        model[1].weight[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"Layer '1' has 1 non-finite weight"):
        hf_lotion.prepare(model, hf_lotion.LotionConfig(group_size=8))
    assert not any(isinstance(m, LotionLinear) for m in model.modules())


def test_prepare_twice_is_refused():
    model = nn.Sequential(nn.Linear(32, 8))
    hf_lotion.prepare(model, hf_lotion.LotionConfig(group_size=8))
    with pytest.raises(ValueError, match="already has LotionLinear"):
        hf_lotion.prepare(model, hf_lotion.LotionConfig(group_size=8))
