"""QAT methods are registered strategies: a new one is a subclass defined here, touching no library file."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_config
from transformers import AutoModelForCausalLM

import hf_lotion
from hf_lotion import LotionConfig, Option, QatMethod, Surrogate, kernels
from hf_lotion.kernels import dispatch
from hf_lotion.quant.spec import invalid_value


@dataclass(frozen=True)
class ClippedLinear(Surrogate):
    """`g(v) = max(0, 1 - slope * |v - round(v)|)`: full gradient on the grid, damped between grid points."""

    slope: float

    def __call__(self, v):
        return (1.0 - self.slope * (v - torch.round(v)).abs()).clamp_min(0.0)


def _slope(name, value, owner):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 2:
        invalid_value(owner, name, value, "a number in (0, 2]")
    return float(value)


class ClippedLinearQat(QatMethod):
    name = "toy_clipped"
    options = (Option("clip_slope", 1.0, _slope, "how fast the gradient falls off away from the grid"),)

    def surrogate(self):
        return ClippedLinear(self.clip_slope)


@pytest.fixture
def toy_method():
    hf_lotion.register_method(ClippedLinearQat)
    yield ClippedLinearQat
    hf_lotion.unregister_method("toy_clipped")


def toy_model(method="toy_clipped", seed=0, **options):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    return hf_lotion.prepare(model, LotionConfig(bits=3, group_size=32, method=method, **options))


def test_config_validates_the_new_methods_options(toy_method):
    assert "toy_clipped" in hf_lotion.method_names()
    assert LotionConfig(method="toy_clipped").clip_slope == 1.0
    assert LotionConfig(method="toy_clipped", clip_slope=0.5).method_options() == {"clip_slope": 0.5}
    with pytest.raises(
        ValueError, match=r"LotionConfig\.clip_slope=3 is not supported; allowed: a number in \(0, 2\]"
    ):
        LotionConfig(method="toy_clipped", clip_slope=3)
    with pytest.raises(ValueError, match=r"LotionConfig\.lotion_lambda=1\.0 .* not of method='toy_clipped'"):
        LotionConfig(method="toy_clipped", lotion_lambda=1.0)


def test_the_new_method_trains_with_its_own_surrogate(toy_method):
    model = toy_model(clip_slope=1.5)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0].mlp.up_proj
    captured = {}
    layer.register_forward_hook(lambda m, a, out: captured.update(x=a[0].detach(), out=out))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        captured["out"].retain_grad()
        loss.backward()
        if step == 0:
            # By hand: dL/dw = (dL/dy)^T x * g(w / s) where v rounds into the range, g the clipped surrogate.
            dy, x = captured["out"].grad, captured["x"]
            upstream = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            w = layer.weight.detach()
            s = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 3.5
            v = w.reshape(w.shape[0], -1, 32) / s
            window = (v >= -4.5) & (v <= 3.5 + 1e-6)  # the absmax element sits at 3.5 (full grid)
            g = (1.0 - 1.5 * (v - torch.round(v)).abs()).clamp_min(0.0) * window
            torch.testing.assert_close(layer.weight.grad, upstream * g.reshape(w.shape), rtol=1e-5, atol=1e-8)
            ste = upstream * window.reshape(w.shape)
            assert not torch.allclose(layer.weight.grad, ste)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.skipif(not dispatch.interpreter_enabled(), reason="needs Triton's CPU interpreter")
def test_a_method_without_a_kernel_runs_its_reference_where_kernels_are_forced(toy_method):
    pytest.importorskip("triton")
    w = torch.randn(8, 64) * 0.05
    scales = kernels.absmax_scales(w, 3, 32)
    grad_out = torch.randn(8, 64)
    grads = {}
    for name, surrogate in (("toy", ClippedLinear(1.0)), ("ste", None)):
        for backend in ("triton", "reference"):
            weight = w.clone().requires_grad_()
            with kernels.kernel_backend(backend):
                kernels.fake_quantize(weight, scales, 3, 32, surrogate).backward(grad_out)
            grads[name, backend] = weight.grad
    assert torch.equal(grads["toy", "triton"], grads["toy", "reference"])
    assert not torch.allclose(grads["toy", "triton"], grads["ste", "triton"])


def test_the_new_method_saves_and_reloads(toy_method, tmp_path):
    model = toy_model(clip_slope=0.25)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = reloaded.model.layers[0].mlp.up_proj
    assert layer.method == ClippedLinearQat(clip_slope=0.25)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval(), reloaded.eval()
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    hf_lotion.unregister_method("toy_clipped")
    try:
        with pytest.raises(
            ValueError,
            match=r"method='toy_clipped' \(saved in the checkpoint\) is not supported.*register_method",
        ):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        hf_lotion.register_method(ClippedLinearQat)


def test_registration_refuses_taken_names_and_non_methods(toy_method):
    class Other(QatMethod):
        name = "toy_clipped"

    with pytest.raises(ValueError, match=r"already registered as 'toy_clipped'.*replace=True"):
        hf_lotion.register_method(Other)
    hf_lotion.register_method(Other, replace=True)
    assert LotionConfig(method="toy_clipped").method_options() == {}
    hf_lotion.register_method(ClippedLinearQat, replace=True)
    with pytest.raises(ValueError, match=r"needs a QatMethod subclass with a `name`"):
        hf_lotion.register_method(F.linear)


def test_builtin_methods_declare_their_strategies():
    methods = {
        name: hf_lotion.methods.build_method(name)
        for name in ("lotion", "stableqat", "ste", "full_precision")
    }
    assert methods["lotion"].surrogate() is None and methods["lotion"].penalty() is not None
    assert methods["full_precision"].surrogate() is None and methods["full_precision"].penalty() is None
    assert methods["ste"].surrogate().kernel_amplitudes == ()
    assert (
        methods["stableqat"].surrogate().kernel_amplitudes == (0.21,) and methods["stableqat"].learned_scales
    )
    assert hf_lotion.methods.build_method("lotion", lotion_lambda=0.0).penalty() is None
    with pytest.raises(
        ValueError, match=r"learned_scales=True .* learned scales need a fake-quantized forward"
    ):

        class Latent(QatMethod):
            name = "latent_with_scales"
            options = (Option("learned_scales", True, lambda n, v, o: v),)

        Latent()
