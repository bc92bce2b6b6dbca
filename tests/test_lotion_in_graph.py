"""LOTION trains in every loop: the penalty rides on the model's loss, its curvature is the per-token Fisher.

Each path takes one SGD step (learning rate 1) and must apply exactly the reference LOTION gradient
`grad L + (lambda/2) G s (1 - 2p)`, computed independently in float64 (`lotion_reference.py`).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_config
from lotion_paths import FP32_TOLERANCE, PATHS, TOLERANCE, plain_loop
from lotion_reference import hand_slope, reference_gradients
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import hf_lotion
from hf_lotion import LotionConfig

hf_logging.set_verbosity_error()

# Large enough that the penalty is a visible share of the update (at least a few percent in every layer).
LAMBDA = 100.0
SEQ = 16


def lotion_model(method: str = "lotion", seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    if method == "lotion":
        options.setdefault("lotion_lambda", LAMBDA)
    return hf_lotion.prepare(model, LotionConfig(bits=2, group_size=32, method=method, **options))


def token_ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def latent(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().clone() for name, layer in hf_lotion.lotion_layers(model)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def assert_update(before, model, expected, tolerance, what=""):
    for name, layer in hf_lotion.lotion_layers(model):
        update = before[name] - layer.weight.detach()  # SGD, learning rate 1
        error = relative_error(update, expected[name])
        assert error < tolerance, (what, name, error)


# -- one optimizer step per training loop ------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_one_step_applies_the_reference_lotion_gradient(path):
    if path == "trl-sft-trainer":
        pytest.importorskip("trl")
    model = lotion_model()
    before = latent(model)
    seen = PATHS[path](model, token_ids())
    assert sum(batch["input_ids"].shape[0] for batch in seen) == 16
    _, _, expected = reference_gradients(lotion_model(), seen, LAMBDA)
    assert_update(before, model, expected, TOLERANCE.get(path, FP32_TOLERANCE), path)
    runtime = hf_lotion.penalty_runtime(model)
    assert (runtime.step, runtime.updates) == (1, 1)


def test_the_penalty_changes_the_update_from_the_first_step():
    ids = token_ids()
    runs = {}
    for method in ("lotion", "full_precision"):
        model = lotion_model(method)
        before = latent(model)
        plain_loop(model, ids)
        runs[method] = {
            name: before[name] - layer.weight.detach() for name, layer in hf_lotion.lotion_layers(model)
        }
    _, curvature, _ = reference_gradients(lotion_model(), [{"input_ids": ids, "labels": ids}], LAMBDA)
    reference = lotion_model()
    for name, layer in hf_lotion.lotion_layers(reference):
        penalty = 0.5 * LAMBDA * curvature[name] * hand_slope(layer.weight, 2, 32)
        difference = runs["lotion"][name] - runs["full_precision"][name]
        assert penalty.abs().max() > 0
        assert relative_error(difference, penalty) < 1e-3, name


@pytest.mark.parametrize("micro", [1, 4], ids=["1x16", "4x4"])
def test_later_steps_use_the_curvature_of_finished_steps(micro):
    """Step 2 applies grad L(batch 2) + (lambda/2) G(batch 1) s (1 - 2p): the EMA (bias-corrected) of step 1."""
    first, second = token_ids(seed=1), token_ids(seed=2)
    model = lotion_model()
    plain_loop(model, first, micro=micro)
    after_first = copy.deepcopy(model)
    before = latent(model)
    plain_loop(model, second, micro=micro)
    _, curvature, _ = reference_gradients(lotion_model(), [{"input_ids": first, "labels": first}], LAMBDA)
    loss_grads, _, _ = reference_gradients(after_first, [{"input_ids": second, "labels": second}], LAMBDA)
    expected = {
        name: loss_grads[name] + 0.5 * LAMBDA * curvature[name] * hand_slope(layer.weight, 2, 32)
        for name, layer in hf_lotion.lotion_layers(after_first)
    }
    assert_update(before, model, expected, FP32_TOLERANCE)


def test_logged_penalty_is_its_definition():
    model = lotion_model()
    ids = token_ids()
    _, curvature, _ = reference_gradients(lotion_model(), [{"input_ids": ids, "labels": ids}], LAMBDA)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    expected = 0.0
    for name, layer in hf_lotion.lotion_layers(model):
        w = layer.weight.detach().double().reshape(layer.out_features, -1, 32)
        s = w.abs().amax(-1, keepdim=True).float().double() / 1.5
        p = (w / s).clamp(-2, 1) - torch.floor((w / s).clamp(-2, 1))
        expected += float((curvature[name] * (s * s * p * (1 - p)).reshape(curvature[name].shape)).sum())
    assert hf_lotion.penalty_runtime(model).pop_penalty() == pytest.approx(0.5 * LAMBDA * expected, rel=1e-4)
    assert hf_lotion.penalty_runtime(model).pop_penalty() is None  # reset after reading


# -- the curvature's scale ---------------------------------------------------------------------------------


def corpus_blocks(n: int) -> torch.Tensor:
    from hf_lotion.trainer.recipes import byte_lm_splits

    train, _ = byte_lm_splits(seq_len=64)
    return train.blocks[:n]


def byte_model() -> nn.Module:
    from transformers import LlamaForCausalLM

    from hf_lotion.trainer.recipes import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128))
    return hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32))


def curvature_after_one_step(model, batches, scale=1.0) -> dict[str, torch.Tensor]:
    model.train()
    for batch in batches:
        (model(input_ids=batch, labels=batch).loss * scale / len(batches)).backward()
    runtime = hf_lotion.penalty_runtime(model)
    runtime.close_window()  # what the optimizer step does
    beta = runtime.penalty.curvature_beta
    return {name: ema / (1 - beta) for name, ema in runtime.ema.items()}


def test_curvature_scale_does_not_depend_on_batch_size():
    """Per-token Fisher at batch 4 / 16 / 64 within 1.5x; `N * mean_grad**2` (the old estimate) is not."""
    blocks = corpus_blocks(64)
    means, old = [], []
    for batch_size in (4, 16, 64):
        model = byte_model()
        curvature = curvature_after_one_step(model, [blocks[:batch_size]])
        means.append(torch.stack([g.mean() for g in curvature.values()]).mean().item())
        n = batch_size * (blocks.shape[1] - 1)
        old.append(
            torch.stack(
                [(n * layer.weight.grad.square()).mean() for _, layer in hf_lotion.lotion_layers(model)]
            )
            .mean()
            .item()
        )
    assert max(means) / min(means) < 1.5, means
    assert max(old) / min(old) > 3.0, old  # the batch-size dependence this estimator removes


def test_curvature_is_the_same_under_accumulation_and_loss_scaling():
    blocks = corpus_blocks(16)
    whole = curvature_after_one_step(byte_model(), [blocks])
    accumulated = curvature_after_one_step(byte_model(), list(blocks.chunk(4)))
    scaled = curvature_after_one_step(byte_model(), [blocks], scale=2.0**16)  # what an fp16 GradScaler does
    for name, g in whole.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-5, atol=0)
        assert torch.equal(scaled[name], g), name


@pytest.mark.parametrize(
    ("shape", "reduce"),
    [pytest.param((1, 1), "sum", id="data-parallel-replica"), pytest.param((2, 1), "mean", id="unscattered")],
)
def test_num_items_as_data_parallel_passes_it_gives_the_scalar_step(shape, reduce):
    """nn.DataParallel (several GPUs, no torchrun): Trainer expands the token count to `(n_gpu, 1)` copies,
    so a replica's loss is `(1, 1)`, or `(n_gpu, 1)` copies when the module runs unscattered, and the
    trainer averages them. LOTION's step (gradient, penalty, curvature) equals the scalar count's."""
    ids = token_ids(4)
    count = torch.tensor(4 * (SEQ - 1) * 2)  # as if this were half of the step's tokens
    results = []
    for num_items, reduction in ((count, "sum"), (count.reshape(1, 1).expand(*shape), reduce)):
        model = lotion_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=num_items).loss
        getattr(loss, reduction)().backward()
        penalty = hf_lotion.penalty_runtime(model).pop_penalty()
        optimizer.step()
        results.append((latent(model), hf_lotion.penalty_runtime(model).ema, penalty))
    (weights, ema, penalty), (dp_weights, dp_ema, dp_penalty) = results
    assert penalty > 0 and dp_penalty == penalty
    for name in weights:
        assert torch.equal(dp_weights[name], weights[name]), name
        assert torch.equal(dp_ema[name], ema[name]), name


def test_data_parallel_replicas_are_refused_with_the_supported_call():
    """nn.DataParallel replicates the model into threads that share the penalty state and own no
    parameters: LOTION refuses it, naming DDP, instead of never closing its step windows."""
    model = lotion_model()
    replica = copy.copy(model)  # what torch.nn.parallel.replicate marks on each replica
    replica._is_replica = True
    ids = token_ids(2)
    with pytest.raises(ValueError, match=r"cannot train under nn\.DataParallel.*DistributedDataParallel"):
        replica(input_ids=ids, labels=ids)
    model(input_ids=ids, labels=ids).loss.backward()  # the model itself still trains


def test_curvature_every_k_steps_and_bias_corrected_ema():
    model = lotion_model(curvature_every=2, curvature_beta=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    runtime = hf_lotion.penalty_runtime(model)
    history, estimates = [], []
    for step in range(5):
        ids = token_ids(4, seed=step)
        if step % 2 == 0:  # the per-token Fisher of this step, by hand, at the current weights
            estimates.append(reference_gradients(model, [{"input_ids": ids, "labels": ids}], LAMBDA)[1])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((runtime.step, runtime.updates))
    assert history == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]  # estimates at steps 0, 2, 4
    for name, ema in runtime.ema.items():  # EMA with decay 0.5 of G0, G2, G4 (no bias correction stored)
        expected = 0.5 * (0.25 * estimates[0][name] + 0.5 * estimates[1][name] + estimates[2][name])
        assert relative_error(ema, expected) < 1e-4, name
    assert runtime.layer_updates == dict.fromkeys(runtime.ema, 3)


def test_a_shared_layer_is_penalised_once_and_its_curvature_counts_both_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    hf_lotion.prepare(model, LotionConfig(bits=2, group_size=16, lotion_lambda=LAMBDA))
    model.append(model[0])  # one quantized layer called twice
    x, target = torch.randn(8, 32), torch.randn(8, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):  # the second step's penalty uses the first step's curvature (unchanged weights)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target, reduction="sum") / 8
        hf_lotion.add_lotion_penalty(model, loss, num_tokens=8).backward()
        optimizer.step()
    # By hand: the loss gradient, and sum over both calls of delta^2 x^2 of the per-example (summed) loss.
    w = model[0].weight.detach().double().requires_grad_()
    inputs = [x.double()]
    h1 = inputs[0] @ w.T + model[0].bias.double()
    inputs.append(torch.tanh(h1))
    h2 = inputs[1] @ w.T + model[0].bias.double()
    h1.retain_grad(), h2.retain_grad()
    ((h2 - target.double()).square().sum()).backward()
    curvature = sum(d.grad.square().T @ i.square() for d, i in ((h1, inputs[0]), (h2, inputs[1]))) / 8
    expected = w.grad / 8 + 0.5 * LAMBDA * curvature * hand_slope(model[0].weight, 2, 16)
    assert relative_error(model[0].weight.grad, expected) < 1e-4


def test_hand_written_updates_end_the_step_too():
    """Without a torch optimizer, a change of the weights (version counters) ends the step."""
    model = lotion_model(curvature_every=1)
    runtime = hf_lotion.penalty_runtime(model)
    for step in range(3):
        ids = token_ids(4, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 1e-3 * parameter.grad
                parameter.grad = None
    model(input_ids=token_ids(4))  # the next forward sees the changed weights
    assert (runtime.step, runtime.updates) == (3, 3)


def test_a_step_with_non_finite_gradients_leaves_the_curvature_alone(caplog):
    model = lotion_model(curvature_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    runtime = hf_lotion.penalty_runtime(model)
    ids = token_ids(4)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    ema = {name: value.clone() for name, value in runtime.ema.items()}
    output = model(input_ids=ids, labels=ids)
    (output.loss + float("inf") * output.logits.sum()).backward()  # overflowed, as fp16 can
    with caplog.at_level(logging.INFO, logger="hf_lotion.nn.penalty"):
        optimizer.step()
    assert runtime.updates == 1 and "non-finite" in caplog.text
    assert all(torch.equal(runtime.ema[name], value) for name, value in ema.items())


# -- losses the model does not compute ---------------------------------------------------------------------


def test_a_loss_from_the_logits_warns_once_and_add_lotion_penalty_fixes_it(caplog):
    ids = token_ids()

    def own_loss(model, with_penalty):
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        if with_penalty:
            loss = hf_lotion.add_lotion_penalty(model, loss, num_tokens=ids[:, 1:].numel())
        return loss

    model = lotion_model()
    before = latent(model)
    with caplog.at_level(logging.WARNING, logger="hf_lotion.nn.penalty"):
        own_loss(model, with_penalty=False).backward()
        own_loss(model, with_penalty=False).backward()
    assert caplog.text.count("hf_lotion.add_lotion_penalty(model, loss, num_tokens=...)") == 1

    model = lotion_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    own_loss(model, with_penalty=True).backward()
    optimizer.step()
    _, _, expected = reference_gradients(lotion_model(), [{"input_ids": ids, "labels": ids}], LAMBDA)
    assert_update(before, model, expected, FP32_TOLERANCE)


def test_add_lotion_penalty_refuses_bad_input():
    with pytest.raises(ValueError, match=r"has no LOTION penalty: quantize it with LotionConfig"):
        hf_lotion.add_lotion_penalty(lotion_model("ste"), torch.tensor(1.0), 4)
    model = lotion_model()
    with pytest.raises(ValueError, match=r"found no train-mode forward"):
        hf_lotion.add_lotion_penalty(model, torch.tensor(1.0), 4)
    loss = model(input_ids=token_ids(2)).logits.sum()
    with pytest.raises(ValueError, match=r"num_tokens=0 is not supported; allowed: an integer >= 1"):
        hf_lotion.add_lotion_penalty(model, loss, 0)


def test_plain_module_prepared_keeps_every_option_and_trains_with_add_lotion_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    config = LotionConfig(bits=2, group_size=16, lotion_lambda=4.0, curvature_beta=0.5, curvature_every=3)
    hf_lotion.prepare(model, config)
    penalty = hf_lotion.penalty_runtime(model).penalty
    assert (penalty.strength, penalty.curvature_beta, penalty.curvature_every) == (4.0, 0.5, 3)
    x, target = torch.randn(8, 32), torch.randn(8, 8)
    loss = F.mse_loss(model(x), target)
    hf_lotion.add_lotion_penalty(model, loss, num_tokens=8).backward()
    assert hf_lotion.penalty_runtime(model).pop_penalty() > 0


# -- adapters: the penalty acts on the effective weight ----------------------------------------------------


class LowRankAdapter(nn.Module):
    """`W + scaling * B A` through the layer's QAT computation, with `W` frozen (a LoRA-shaped wrapper)."""

    def __init__(self, base: hf_lotion.LotionLinear, rank: int = 4, scaling: float = 2.0) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A

    def forward(self, x):
        return self.base.qat_linear(x, self.effective_weight())


def test_penalty_reaches_adapter_weights_through_the_effective_weight():
    model = lotion_model()
    for name, layer in hf_lotion.lotion_layers(model):
        model.set_submodule(name, LowRankAdapter(layer))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapters = [m for m in model.modules() if isinstance(m, LowRankAdapter)]
    for adapter in adapters:
        adapter.lora_A.requires_grad_(True)
        adapter.lora_B.requires_grad_(True)
    ids = token_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()

    # Reference: the same model with each adapter merged into a plain layer holding the effective weight.
    merged = lotion_model()
    for (_, layer), adapter in zip(hf_lotion.lotion_layers(merged), adapters, strict=True):
        with torch.no_grad():
            layer.weight.copy_(adapter.effective_weight())
    _, _, expected = reference_gradients(merged, [{"input_ids": ids, "labels": ids}], LAMBDA)
    for (name, _), adapter in zip(hf_lotion.lotion_layers(merged), adapters, strict=True):
        grad_weight = expected[name]
        expected_a = adapter.scaling * adapter.lora_B.detach().double().T @ grad_weight
        expected_b = adapter.scaling * grad_weight @ adapter.lora_A.detach().double().T
        assert relative_error(adapter.lora_A.grad, expected_a) < 1e-4, name
        assert relative_error(adapter.lora_B.grad, expected_b) < 1e-4, name
        assert adapter.base.weight.grad is None


def test_frozen_quantized_weights_warn_that_the_penalty_has_nothing_to_train(caplog):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(lotion_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = token_ids(4)
    with caplog.at_level(logging.WARNING, logger="hf_lotion.nn.penalty"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert "LOTION's penalty has nothing to train" in caplog.text
