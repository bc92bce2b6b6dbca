"""One optimizer step of a LOTION model in each training loop users run, for the per-path tests.

Every runner takes a fresh model and a `(16, SEQ)` block of token ids, takes exactly one SGD step with
learning rate 1 (no clipping, decay or schedule), and returns the batches the model saw in train mode, so
that `latent - updated` is the gradient the loop applied and can be compared with
`lotion_reference.reference_gradients` over those batches.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch
from torch.utils.data import DataLoader

from hf_lotion.trainer.recipes import CausalLMBlocks

MICRO = 4  # micro-batches of 4 for the accumulated paths: 4 x 4 = 16


def record_batches(model: torch.nn.Module) -> tuple[list[dict[str, torch.Tensor]], object]:
    """Record `input_ids` and `labels` of every train-mode forward of `model`."""
    seen: list[dict[str, torch.Tensor]] = []

    def hook(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append({"input_ids": kwargs["input_ids"].clone(), "labels": kwargs["labels"].clone()})

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def plain_loop(model, ids, micro=1, num_items=False, autocast=None, scaler=None):
    """`model(**batch).loss.backward(); optimizer.step()`, with accumulation, autocast or a GradScaler."""
    seen, handle = record_batches(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    total = int((ids[:, 1:] != -100).sum())
    model.train()
    for chunk in ids.chunk(micro):
        kwargs = {"input_ids": chunk, "labels": chunk}
        if num_items:  # the loss is then a sum over the micro-batch divided by the step's token count
            kwargs["num_items_in_batch"] = torch.tensor(total)
        context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with context:
            loss = model(**kwargs).loss
        if not num_items:
            loss = loss / micro
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad()
    handle.remove()
    return seen


def training_kwargs(out: str) -> dict:
    return dict(
        output_dir=out,
        max_steps=1,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=16 // MICRO,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )


def hf_trainer(model, ids, trainer_cls=None):
    """`transformers.Trainer` (or a subclass) with gradient accumulation 4 x 4."""
    from transformers import Trainer, TrainingArguments

    seen, handle = record_batches(model)
    with tempfile.TemporaryDirectory() as out:
        trainer = (trainer_cls or Trainer)(
            model=model, args=TrainingArguments(**training_kwargs(out)), train_dataset=CausalLMBlocks(ids)
        )
        trainer.train()
    handle.remove()
    return seen


def lotion_trainer(model, ids):
    from hf_lotion import LotionTrainer

    return hf_trainer(model, ids, LotionTrainer)


def sft_trainer(model, ids):
    """TRL's `SFTTrainer` on pre-tokenized examples (it computes the loss from its fused LM head)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    seen, handle = record_batches(model)
    with tempfile.TemporaryDirectory() as out:
        # TRL turns bf16 on by default, on CPU too: keep float32, like the other float32 paths.
        config = SFTConfig(**training_kwargs(out), bf16=False, max_length=None, eos_token=None)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
            processing_class=word_tokenizer(int(ids.max()) + 1),
        )
        trainer.train()
    handle.remove()
    return seen


def accelerate_loop(model, ids):
    """An accelerate loop: `accelerator.accumulate`, `accelerator.backward`, accumulation 4 x 4."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    seen, handle = record_batches(model)
    accelerator = Accelerator(gradient_accumulation_steps=16 // MICRO, cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(CausalLMBlocks(ids), batch_size=MICRO, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    try:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
    finally:
        handle.remove()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return seen


def checkpointed_loop(model, ids, reentrant=True):
    """Activation checkpointing (the layers run again inside backward), accumulation 4 x 4."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return plain_loop(model, ids, micro=MICRO)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over tokens `t0 .. t{n-1}` (TRL needs a tokenizer; nothing is downloaded)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t1", eos_token="t2")


PATHS = {
    "plain-loop-1x16": lambda m, ids: plain_loop(m, ids),
    "plain-loop-4x4": lambda m, ids: plain_loop(m, ids, micro=MICRO),
    "num-items-4x4": lambda m, ids: plain_loop(m, ids, micro=MICRO, num_items=True),
    "bf16-autocast": lambda m, ids: plain_loop(m, ids, autocast=torch.bfloat16),
    "fp16-grad-scaler": lambda m, ids: plain_loop(m, ids, micro=MICRO, scaler=torch.amp.GradScaler("cpu")),
    "fp16-autocast-scaler": lambda m, ids: plain_loop(
        m, ids, autocast=torch.float16, scaler=torch.amp.GradScaler("cpu")
    ),
    "trainer": hf_trainer,
    "lotion-trainer": lotion_trainer,
    "trl-sft-trainer": sft_trainer,
    "accelerate": accelerate_loop,
    "checkpointing-reentrant": checkpointed_loop,
    "checkpointing-non-reentrant": lambda m, ids: checkpointed_loop(m, ids, reentrant=False),
}
# Relative tolerance of the update against the float64 reference (max error / max |reference|, per layer):
# float32 loops, and the loops whose matmuls run in 16-bit floats.
TOLERANCE = {"bf16-autocast": 3e-2, "fp16-autocast-scaler": 5e-3}
FP32_TOLERANCE = 1e-4
