"""QAT-LoRA against plain LoRA + RTN, QLoRA (NF4) and LoRA over a packed base, on a pretrained tiny Llama (CPU).

A tiny byte-level Llama (`hf_lotion.trainer.recipes.tiny_llama_config`) is first trained in full precision to
near convergence on the embedded corpus, once, and cached (keyed by its settings). Every arm then trains LoRA
adapters (same steps, data order, rank, alpha, schedule; adapters on every quantized linear) from that
checkpoint and is evaluated on held-out blocks *after merging*:

* `fp`: plain LoRA on the float model, merged (the reference, no quantization);
* `rtn` (a): the same merged model, then round-to-nearest (`prepare(method="full_precision")` + `convert`);
* `rtn_nf4`: the same merged model loaded as bitsandbytes NF4 (context for `qlora`, 4 bits only);
* `qlora` (b): LoRA over a bitsandbytes NF4 base, merged by peft (re-quantized to NF4; 4 bits only);
* `packed` (c): LoRA over the packed hf-lotion base (RTN of the float model, converted, saved, reloaded),
  merged with `hf_lotion.requantizing_merge()`; the adapter model before the merge is evaluated too;
* `ste`, `stableqat`, `lotion`: QAT adapters `Q(W + s B A)` (`get_peft_model` on a `LotionConfig` model),
  merged with `merge_and_unload()` and packed with `hf_lotion.convert`.

The learning rate is tuned once per arm family and bit width on seed 0 over `--lrs` (the plain-LoRA family on
its float eval loss, every other family on its quantized eval loss after merge); the other seeds rerun the chosen
one. The share of (a)'s degradation recovered is `(loss_a - loss_x) / (loss_a - loss_fp)`, seed-matched.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lora_qat.py --out benchmarks/results/lora_qat.jsonl
    OMP_WAIT_POLICY=PASSIVE python benchmarks/lora_qat.py --smoke
    python benchmarks/lora_qat.py --summarize benchmarks/results/lora_qat.jsonl
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import hf_lotion
from hf_lotion import LotionConfig
from hf_lotion.trainer.recipes import byte_lm_splits, tiny_llama_config

QAT_METHODS = ("ste", "stableqat", "lotion")
# family -> the arms one training run of it gives
FAMILIES = {"plain": ("fp", "rtn", "rtn_nf4"), "qlora": ("qlora",), "packed": ("packed",)} | {
    m: (m,) for m in QAT_METHODS
}
ARM_ORDER = ("fp", "rtn", "rtn_nf4", "qlora", "packed", *QAT_METHODS)
ARM_LABELS = {
    "fp": "fp LoRA, merged (no quantization)",
    "rtn": "(a) LoRA, merged, then RTN",
    "rtn_nf4": "LoRA, merged, then NF4",
    "qlora": "(b) QLoRA over NF4, merged (NF4)",
    "packed": "(c) LoRA over packed base, requantizing merge",
    "ste": "QAT-LoRA ste, merged + convert",
    "stableqat": "QAT-LoRA stableqat, merged + convert",
    "lotion": "QAT-LoRA lotion, merged + convert",
}
CACHE_VERSION = 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data, evaluation, training loop --------------------------------------------------------------------------


class Data:
    def __init__(self, seq_len: int, eval_blocks: int) -> None:
        train, evals = byte_lm_splits(seq_len=seq_len, eval_blocks=eval_blocks)
        self.train, self.eval = train.blocks, evals.blocks

    def order(self, seed: int, n: int) -> torch.Tensor:
        """`n` training-block indices for `seed`: epochs of fresh permutations (the same for every arm)."""
        generator = torch.Generator().manual_seed(10_000 + seed)
        chunks = [
            torch.randperm(len(self.train), generator=generator) for _ in range(-(-n // len(self.train)))
        ]
        return torch.cat(chunks)[:n]


@torch.no_grad()
def eval_logits_and_loss(model, blocks: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, float]:
    model.eval()
    logits, total, count = [], 0.0, 0
    for start in range(0, len(blocks), chunk):
        ids = blocks[start : start + chunk]
        out = model(input_ids=ids, labels=ids)
        n = ids.numel() - ids.shape[0]
        total, count = total + out.loss.item() * n, count + n
        logits.append(out.logits.float())
    return torch.cat(logits), total / count


def eval_loss(model, blocks: torch.Tensor) -> float:
    return eval_logits_and_loss(model, blocks)[1]


def train_loop(model, data: Data, seed: int, steps: int, batch_size: int, lr: float) -> float:
    """AdamW (no weight decay), linear warm-up then cosine to 0, grad-norm clip 1; returns the seconds taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = data.order(seed, steps * batch_size).view(steps, batch_size)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids = data.train[order[step]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# -- the pretrained float model (cached) ---------------------------------------------------------------------


def pretrained_checkpoint(args, data: Data) -> tuple[Path, dict]:
    """Train (or reuse) the full-precision tiny Llama; returns its directory and metadata."""
    settings = {
        "version": CACHE_VERSION,
        "model": {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "layers": args.layers},
        "steps": args.pretrain_steps,
        "lr": args.pretrain_lr,
        "batch_size": args.pretrain_batch_size,
        "seq_len": args.seq_len,
        "eval_blocks": args.eval_blocks,
        "seed": 0,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(args.cache_dir) / f"lora_qat_pretrained_{key}"
    meta_path = directory / "pretrain.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        log(f"pretrained checkpoint from cache {directory} (eval loss {meta['eval_loss']:.4f})")
        return directory, {**meta, "cached": True}
    log(f"pretraining the float model ({args.pretrain_steps} steps) -> {directory}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args))
    seconds = train_loop(model, data, 0, args.pretrain_steps, args.pretrain_batch_size, args.pretrain_lr)
    meta = {**settings, "eval_loss": eval_loss(model, data.eval), "train_s": seconds}
    model.save_pretrained(directory)
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"pretrained in {seconds:.0f} s, eval loss {meta['eval_loss']:.4f}")
    return directory, meta


def model_config(args):
    return tiny_llama_config(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers
    )


def packed_base(args, fp_dir: Path, bits: int, work: Path) -> Path:
    """RTN of the float model at `bits`, converted and saved (the base of arm (c))."""
    directory = work / f"packed_{bits}"
    if not directory.exists():
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=rtn_config(args, bits))
        hf_lotion.convert(model).save_pretrained(directory)
    return directory


def rtn_config(args, bits: int) -> LotionConfig:
    return LotionConfig(bits=bits, group_size=args.group_size, method="full_precision")


def nf4_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


def load_nf4(directory) -> torch.nn.Module:
    """`directory` loaded as bitsandbytes NF4 (blocks of 64), computing in fp32 on every path.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight into a CPU layout (bf16 block
    scales) at its first eval-mode forward; peft's merge then dequantizes that layout as if it were the ordinary
    one and writes garbage (eval loss 3.1 -> 5.1 on the smoke run). Keeping the ordinary layout avoids both.
    """
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=nf4_config())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def rtn_loss(args, model, bits: int, data: Data) -> float:
    """Eval loss of `model` (float, not modified) rounded to nearest at `bits` and packed."""
    quantized = hf_lotion.prepare(copy.deepcopy(model), rtn_config(args, bits))
    return eval_loss(hf_lotion.convert(quantized), data.eval)


def nf4_loss(model, data: Data, work: Path) -> float:
    """Eval loss of `model` (float) saved and reloaded as bitsandbytes NF4."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        model.save_pretrained(scratch)
        return eval_loss(load_nf4(scratch), data.eval)


# -- one arm family at one learning rate and seed ----------------------------------------------------------------


def lora_config(args) -> LoraConfig:
    return LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0)


def run_family(args, family: str, bits: int | None, lr: float, seed: int, ctx: dict) -> list[dict]:
    """Train one family's adapters; the records of the arms it gives (one per arm and bit width)."""
    data, fp_dir, work = ctx["data"], ctx["fp_dir"], ctx["work"]
    if family == "plain":
        base = AutoModelForCausalLM.from_pretrained(fp_dir)
    elif family == "qlora":
        base = load_nf4(fp_dir)
    elif family == "packed":
        base = AutoModelForCausalLM.from_pretrained(ctx["packed_dirs"][bits])
    else:
        config = LotionConfig(bits=bits, group_size=args.group_size, method=family)
        base = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
    torch.manual_seed(seed)  # the adapters' init: the same A matrices for every arm of a seed
    model = get_peft_model(base, lora_config(args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = train_loop(model, data, seed, args.steps, args.batch_size, lr)
    common = {
        "family": family,
        "seed": seed,
        "lr": lr,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "r": args.rank,
        "alpha": args.alpha,
        "group_size": args.group_size,
        "trainable_params": trainable,
        "train_s": seconds,
        "s_per_step": seconds / args.steps,
    }
    records = []
    if family == "plain":
        merged = model.merge_and_unload()
        fp = eval_loss(merged, data.eval)
        records.append({"arm": "fp", "bits": None, "eval_loss": fp, **common})
        for b in args.bits:
            records.append({"arm": "rtn", "bits": b, "eval_loss": rtn_loss(args, merged, b, data), **common})
        if 4 in args.bits and "qlora" in args.families:
            records.append({"arm": "rtn_nf4", "bits": 4, "eval_loss": nf4_loss(merged, data, work), **common})
        return records
    before_logits, before = eval_logits_and_loss(model, data.eval)
    extra = {"keep_scales_merge_loss": keep_scales_merge_loss(model, data)} if family == "packed" else {}
    if family == "packed":
        with hf_lotion.requantizing_merge():
            merged = model.merge_and_unload()
    else:
        merged = model.merge_and_unload()
        if family in QAT_METHODS:
            merged = hf_lotion.convert(merged)
    after_logits, after = eval_logits_and_loss(merged, data.eval)
    diff = (after_logits - before_logits).abs()
    arm = family
    return [
        {
            "arm": arm,
            "bits": 4 if family == "qlora" else bits,
            "eval_loss": after,
            "premerge_loss": before,
            "merge_loss_change": after - before,
            "merge_logit_max_abs_diff": diff.max().item(),
            "merge_logit_mean_abs_diff": diff.mean().item(),
            "logit_rms": before_logits.pow(2).mean().sqrt().item(),
            **extra,
            **common,
        }
    ]


def keep_scales_merge_loss(model, data: Data) -> float:
    """Eval loss of a merge into the packed base that keeps the base's scales: RTN(dequantize(W) + s B A, s_W).

    A diagnostic next to `hf_lotion.requantizing_merge()`, which refits absmax scales to the merged weight (on the
    full grid that rescales every group by up to 2^(b-1) / (2^(b-1) - 1/2) even when B A = 0); `model` is unchanged.
    """
    from hf_lotion.adapters.lora import PackedLoraLinear
    from hf_lotion.quant import pack_int, quantize_rtn

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, PackedLoraLinear):
                base = module.get_base_layer()
                weight = base.dequantized_weight()
                for adapter in module.active_adapters:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                q = quantize_rtn(weight, base.weight_scale, base.bits, base.group_size)
                base.weight.copy_(pack_int(q, base.bits))
    return eval_loss(clone.unload(), data.eval)


def objective(records: list[dict], family: str, bits: int) -> float:
    """What the sweep minimises at `bits`: the family's quantized eval loss after merge (for plain LoRA, that of
    (a), its merged model rounded to nearest: the strongest plain-LoRA baseline; its float loss barely moves)."""
    arm = "rtn" if family == "plain" else family
    return next(r["eval_loss"] for r in records if r["arm"] == arm and r["bits"] == bits)


# -- the driver -----------------------------------------------------------------------------------------------


def family_bits(args, family: str) -> list[int]:
    if family == "qlora":
        return [4] if 4 in args.bits else []
    return list(args.bits)


class Runner:
    """Runs (family, bits, lr, seed) once: plain LoRA and QLoRA train the same adapters whatever the bit width."""

    def __init__(self, args, ctx: dict, start: float, sweep_sink) -> None:
        self.args, self.ctx, self.start, self.sweep_sink = args, ctx, start, sweep_sink
        self.cache: dict[tuple, list[dict]] = {}
        self.sweep: list[dict] = []

    def __call__(self, family: str, bits: int, lr: float, seed: int) -> list[dict]:
        key = (family, None if family in ("plain", "qlora") else bits, lr, seed)
        if key not in self.cache:
            records = run_family(self.args, family, key[1], lr, seed, self.ctx)
            self.cache[key] = records
            if seed == self.args.seeds[0]:
                self.sweep += records
                for record in records:
                    self.sweep_sink.write(json.dumps(record) + "\n")
                self.sweep_sink.flush()
            log(
                f"[{time.perf_counter() - self.start:6.0f} s] {family} lr={lr:g} seed={seed}: "
                + ", ".join(f"{r['arm']}{r['bits'] or ''} {r['eval_loss']:.4f}" for r in records)
                + f" ({records[0]['s_per_step']:.3f} s/step)"
            )
        return self.cache[key]

    def tune(self, family: str, bits: int, lrs: list[float], extend: int) -> float:
        """The learning rate with the lowest objective on the first seed, stepping past an edge winner `extend`
        times at most (by the grid's first or last ratio)."""
        seed = self.args.seeds[0]
        tried = {lr: objective(self(family, bits, lr, seed), family, bits) for lr in lrs}
        for _ in range(extend if len(lrs) > 1 else 0):
            grid, best = sorted(tried), min(tried, key=tried.get)
            if best == grid[0]:
                lr = best * grid[0] / grid[1]
            elif best == grid[-1]:
                lr = best * grid[-1] / grid[-2]
            else:
                break
            tried[lr] = objective(self(family, bits, lr, seed), family, bits)
        return min(tried, key=tried.get)


def chosen_records(family: str, bits: int, runs: list[list[dict]]) -> list[dict]:
    """The records of the bits-`bits` table from the chosen runs (plain LoRA: fp, rtn and rtn_nf4 at `bits`)."""
    out = []
    for records in runs:
        for record in records:
            if record["arm"] == "fp":
                out.append({**record, "bits": bits})
            elif record["bits"] == bits:
                out.append(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="swept on the first seed"
    )
    parser.add_argument(
        "--extend", type=int, default=2, help="learning rates tried past an edge winner, at most (0: none)"
    )
    parser.add_argument(
        "--lr", action="append", default=[], metavar="FAMILY[:BITS]=LR", help="skip the sweep for a family"
    )
    parser.add_argument("--steps", type=int, default=120, help="LoRA steps, every arm")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-batch-size", type=int, default=16)
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(
            "HF_LOTION_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "hf_lotion_bench")
        ),
    )
    parser.add_argument(
        "--out", default=None, help="JSONL of the chosen runs (sweep runs go to *_sweep.jsonl)"
    )
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check of every arm")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL", help="only print the tables of saved runs")
    args = parser.parse_args()
    if args.summarize:
        records = [r for path in args.summarize for r in read_jsonl(path)]
        sweep = [
            r
            for path in args.summarize
            if Path(sweep_path(path)).exists()
            for r in read_jsonl(sweep_path(path))
        ]
        print(report(records, sweep))
        return
    if args.smoke:
        args.pretrain_steps, args.steps, args.seeds, args.lrs = 20, 4, [0], [3e-3]
        args.eval_blocks = 8
        if args.out is None:
            args.out = os.path.join(tempfile.gettempdir(), "lora_qat_smoke.jsonl")
    args.out = args.out or "lora_qat.jsonl"
    quiet()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    fixed = parse_fixed_lrs(args.lr)

    start = time.perf_counter()
    data = Data(args.seq_len, args.eval_blocks)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    fp_dir, meta = pretrained_checkpoint(args, data)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=args.cache_dir) as scratch,
        open(args.out, "w") as sink,
        open(sweep_path(args.out), "w") as sweep_sink,
    ):
        work = Path(scratch)
        ctx = {"data": data, "fp_dir": fp_dir, "work": work}
        ctx["packed_dirs"] = {b: packed_base(args, fp_dir, b, work) for b in args.bits}
        pretrained = AutoModelForCausalLM.from_pretrained(fp_dir)
        context = [
            {
                "arm": "pretrained_fp",
                "bits": None,
                "seed": None,
                "eval_loss": eval_loss(pretrained, data.eval),
            }
        ]
        context += [
            {
                "arm": "pretrained_rtn",
                "bits": b,
                "seed": None,
                "eval_loss": rtn_loss(args, pretrained, b, data),
            }
            for b in args.bits
        ]
        if 4 in args.bits:
            context.append(
                {
                    "arm": "pretrained_nf4",
                    "bits": 4,
                    "seed": None,
                    "eval_loss": nf4_loss(pretrained, data, work),
                }
            )
        for record in context:
            log(f"  {record['arm']} bits={record['bits']}: {record['eval_loss']:.4f}")
            sink.write(json.dumps(record) + "\n")
        records = list(context)
        run = Runner(args, ctx, start, sweep_sink)
        for family in args.families:
            for bits in family_bits(args, family):
                family_start = time.perf_counter()
                if (family, bits) in fixed:
                    best = fixed[(family, bits)]
                else:
                    best = run.tune(family, bits, args.lrs, extend=args.extend)
                runs = [run(family, bits, best, seed) for seed in args.seeds]
                for record in chosen_records(family, bits, runs):
                    records.append(record)
                    sink.write(json.dumps(record) + "\n")
                sink.flush()
                log(
                    f"[{time.perf_counter() - start:6.0f} s] {family} bits={bits}: lr {best:g} chosen "
                    f"({time.perf_counter() - family_start:.0f} s)"
                )
    total = time.perf_counter() - start
    pretraining = "cached" if meta.get("cached") else f"{meta['train_s']:.0f} s of it"
    log(f"total {total:.0f} s (pretraining: {pretraining})")
    print(report(records, run.sweep, meta=meta, total_s=total))


def parse_fixed_lrs(values: list[str]) -> dict:
    fixed = {}
    for value in values:
        name, lr = value.split("=")
        family, _, bits = name.partition(":")
        if family not in FAMILIES:
            raise SystemExit(f"--lr {value}: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
        for b in [int(bits)] if bits else [2, 3, 4, 8]:
            fixed[(family, b)] = float(lr)
    return fixed


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sweep_path(out: str) -> str:
    path = Path(out)
    return str(path.with_name(path.stem + "_sweep" + path.suffix))


def quiet() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("hf_lotion").setLevel(logging.ERROR)
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(Unsupported layer type|Merge lora module to 4-bit).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


# -- tables ---------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def report(
    records: list[dict], sweep: list[dict], meta: dict | None = None, total_s: float | None = None
) -> str:
    context = {(r["arm"], r["bits"]): r["eval_loss"] for r in records if r["arm"].startswith("pretrained")}
    runs = [r for r in records if not r["arm"].startswith("pretrained")]
    fp = {(r["bits"], r["seed"]): r for r in runs if r["arm"] == "fp"}
    rtn = {(r["bits"], r["seed"]): r for r in runs if r["arm"] == "rtn"}
    fp_step = statistics.median(r["s_per_step"] for r in fp.values()) if fp else float("nan")
    bits_list = sorted({r["bits"] for r in runs if r["bits"] is not None}, reverse=True)
    lines = []
    if meta:
        lines.append(
            f"Pretrained float model: eval loss {meta['eval_loss']:.4f} ({meta['steps']} AdamW steps, "
            f"lr {meta['lr']:g}, batch {meta['batch_size']} x {meta['seq_len']} bytes)."
        )
    if ("pretrained_fp", None) in context:
        lines.append(
            "Without LoRA: fp "
            + f"{context[('pretrained_fp', None)]:.4f}"
            + "".join(
                f"; RTN {b}-bit {context[('pretrained_rtn', b)]:.4f}"
                for b in bits_list
                if ("pretrained_rtn", b) in context
            )
            + (f"; NF4 {context[('pretrained_nf4', 4)]:.4f}" if ("pretrained_nf4", 4) in context else "")
            + "."
        )
    lines += [
        "",
        "| bits | arm | lr | eval loss after merge (mean ± sd) | recovered share of (a)'s degradation | "
        "s/step vs fp LoRA (median) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for bits in bits_list:
        for arm in ARM_ORDER:
            chosen = [r for r in runs if r["arm"] == arm and r["bits"] == bits]
            if not chosen:
                continue
            losses = [r["eval_loss"] for r in chosen]
            shares = [
                (rtn[(bits, r["seed"])]["eval_loss"] - r["eval_loss"])
                / (rtn[(bits, r["seed"])]["eval_loss"] - fp[(bits, r["seed"])]["eval_loss"])
                for r in chosen
                if (bits, r["seed"]) in rtn and (bits, r["seed"]) in fp
            ]
            share = (
                "-"
                if arm in ("fp", "rtn") or not shares
                else f"{100 * statistics.mean(shares):.0f}%"
                + (f" ± {100 * statistics.stdev(shares):.0f}%" if len(shares) > 1 else "")
            )
            speed = statistics.median(r["s_per_step"] for r in chosen) / fp_step
            lrs = sorted({r["lr"] for r in chosen})
            lines.append(
                f"| {bits} | {ARM_LABELS[arm]} | {'/'.join(f'{lr:g}' for lr in lrs)} | {_mean_sd(losses)} | {share} | "
                f"{speed:.2f}x | {len(chosen)} |"
            )
    merge_rows = [r for r in runs if "premerge_loss" in r]
    if merge_rows:
        lines += [
            "",
            "Merge exactness (adapter model in eval mode vs the merged model; mean over seeds):",
            "",
            "| bits | arm | loss before merge | loss after merge | change | max abs logit diff | mean abs logit diff "
            "| logit rms | merge keeping the base's scales (diagnostic) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for bits in bits_list:
            for arm in ARM_ORDER:
                rows = [r for r in merge_rows if r["arm"] == arm and r["bits"] == bits]
                if not rows:
                    continue

                def mean(key, rows=rows):
                    return statistics.mean(r[key] for r in rows)

                lines.append(
                    f"| {bits} | {arm} | {mean('premerge_loss'):.4f} | {mean('eval_loss'):.4f} | "
                    f"{mean('merge_loss_change'):+.4f} | {max(r['merge_logit_max_abs_diff'] for r in rows):.3g} | "
                    f"{mean('merge_logit_mean_abs_diff'):.3g} | {mean('logit_rms'):.3g} | "
                    + (
                        f"{mean('keep_scales_merge_loss'):.4f} |"
                        if "keep_scales_merge_loss" in rows[0]
                        else "- |"
                    )
                )
    if sweep:
        lines += sweep_table(sweep, runs)
    if total_s is not None:
        lines += ["", f"Wall time {total_s:.0f} s."]
    return "\n".join(lines)


def sweep_table(sweep: list[dict], chosen: list[dict]) -> list[str]:
    """First-seed losses per arm and learning rate; * marks the learning rate chosen for that arm and bit width."""
    picked: dict[tuple, set] = {}
    for r in chosen:  # the fp row of the sweep serves every bit width: it may have one chosen lr per width
        picked.setdefault((r["arm"], None if r["arm"] == "fp" else r["bits"]), set()).add(r["lr"])
    lrs = sorted({r["lr"] for r in sweep})
    lines = [
        "",
        f"Learning-rate sweep (seed {sweep[0]['seed']}; eval loss after merge; * = chosen; plain LoRA is chosen on "
        "(a)'s loss at each bit width, the other families on their own):",
        "",
        "| arm | bits | " + " | ".join(f"lr {lr:.3g}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    keys = []
    for r in sweep:
        if (r["arm"], r["bits"]) not in keys:
            keys.append((r["arm"], r["bits"]))
    for arm, bits in keys:
        by_lr = {r["lr"]: r["eval_loss"] for r in sweep if r["arm"] == arm and r["bits"] == bits}
        cells = [
            "-" if lr not in by_lr else f"{by_lr[lr]:.4f}{'*' if lr in picked.get((arm, bits), ()) else ''}"
            for lr in lrs
        ]
        lines.append(f"| {arm} | {bits if bits is not None else '-'} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
