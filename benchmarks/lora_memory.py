"""Peak CPU memory of one LoRA training step: QAT adapters (ste, lotion, stableqat) vs plain LoRA vs LoRA over a
packed base.

One fresh subprocess per configuration loads the same saved Llama (float checkpoint, or its packed RTN version for
the packed base), adds LoRA on every quantized linear (`target_modules="all-linear"`), and runs training steps
(forward + backward + AdamW step, `zero_grad(set_to_none=True)`) on random tokens:

* `first step`: peak RSS during the first step (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus the RSS
  right before it: activations, gradients and transient tensors plus AdamW's state, created at that step;
* `steady step`: the same for each of `--measure-steps` later steps (the peak is reset before each by writing 5
  to `/proc/self/clear_refs`, which resets `ru_maxrss` too), after `--warmup` warm-up steps, and the largest
  kept: what a further step needs on top of the resident model, adapters, optimizer and LOTION curvature state
  (4 steps include one where LOTION estimates its curvature, `curvature_every=4`);
* `peak RSS`: the process's absolute peak during the measured step (the model included), as a user sees it.

Children run with `MALLOC_MMAP_THRESHOLD_=65536` (glibc), so that freed blocks leave RSS at once and RSS
follows live memory (otherwise freed activations stay resident and a later step's peak hides in them).
Every weight is read once before measuring: `from_pretrained` maps the safetensors file, and pages that the
first step would fault in would otherwise count as that step's memory (and a QAT model, whose loading reads
the weights, would look smaller). The peak is also reset right before the first step, so loading the model (which may briefly hold two copies of
some weights) does not count. `extra bytes / quantized param` is `(delta_qat - delta_plain) / n`, `n` the number
of elements of the quantized (adapted) weights.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lora_memory.py --out benchmarks/results/lora_memory.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# The parent only starts children: it imports no torch, so that nothing of it is counted in theirs.
CONFIGS = ("plain", "ste", "lotion", "stableqat", "packed")
LABELS = {
    "plain": "plain LoRA on the float model",
    "ste": "QAT-LoRA ste",
    "lotion": "QAT-LoRA lotion",
    "stableqat": "QAT-LoRA stableqat (learned scales)",
    "packed": "LoRA over the packed base",
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the peak RSS (VmHWM, and with it ru_maxrss) to the current RSS; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# -- children -------------------------------------------------------------------------------------------------


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
    )


def child_build(args) -> None:
    """Save the float checkpoint and its packed RTN version (once, before the measured children)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import hf_lotion

    torch.manual_seed(0)
    LlamaForCausalLM(model_config(args)).save_pretrained(os.path.join(args.work, "float"))
    config = hf_lotion.LotionConfig(bits=args.bits, group_size=args.group_size, method="full_precision")
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.work, "float"), quantization_config=config)
    hf_lotion.convert(model).save_pretrained(os.path.join(args.work, "packed"))


def child_measure(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hf_lotion

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = args.config
    if config == "packed":
        base = AutoModelForCausalLM.from_pretrained(os.path.join(args.work, "packed"))
    elif config == "plain":
        base = AutoModelForCausalLM.from_pretrained(os.path.join(args.work, "float"))
    else:
        quantization = hf_lotion.LotionConfig(bits=args.bits, group_size=args.group_size, method=config)
        base = AutoModelForCausalLM.from_pretrained(
            os.path.join(args.work, "float"), quantization_config=quantization
        )
    model = get_peft_model(
        base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    )
    adapted = [m.get_base_layer() for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    quantized = sum(layer.in_features * layer.out_features for layer in adapted)
    with torch.no_grad():
        # from_pretrained maps the safetensors file: weights are paged in when first read. Read them all now, so
        # that RSS before the step holds the whole model and the step's figure does not include paging it in.
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = torch.randint(
        0, args.vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    model.train()

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measured() -> dict:
        before = rss_bytes()
        reset = reset_peak()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak = peak_bytes()
        return {
            "rss_before": before,
            "peak": peak,
            "delta": peak - before,
            "seconds": seconds,
            "peak_reset": reset,
        }

    first = measured()
    for _ in range(args.warmup):
        step()
    later = [measured() for _ in range(args.measure_steps)]
    steady = max(later, key=lambda m: m["delta"])
    steady = {
        **steady,
        "seconds": sorted(m["seconds"] for m in later)[len(later) // 2],
    }  # the median step time
    print(
        json.dumps(
            {
                "config": config,
                "bits": args.bits,
                "group_size": args.group_size,
                "r": args.rank,
                "quantized_params": quantized,
                "adapted_layers": len(adapted),
                "trainable_params": sum(p.numel() for p in params),
                "first_step": first,
                "steady_step": steady,
                "later_steps": later,
            }
        )
    )


# -- parent ---------------------------------------------------------------------------------------------------


def run_child(mode: str, args, config: str | None = None) -> dict | None:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--work", args.work]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in shape_args(args).items()]
    if config:
        command += ["--config", config]
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if args.mmap_threshold:
        # A fixed mmap threshold: glibc returns every larger block to the OS when it is freed, so RSS follows
        # what is live (with the default dynamic threshold, freed activations stay resident and are reused).
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child {mode} {config or ''} failed:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def shape_args(args) -> dict:
    keys = (
        "hidden", "intermediate", "layers", "heads", "vocab", "seq_len", "batch_size", "rank", "bits",
        "group_size", "threads", "warmup", "measure_steps",
    )  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def table(records: list[dict]) -> str:
    by_config = {}
    for record in records:
        by_config.setdefault(record["config"], []).append(record)

    def mean(config: str, phase: str, key: str) -> float:
        rows = by_config[config]
        return sum(r[phase][key] for r in rows) / len(rows)

    first = records[0]
    lines = [
        f"Llama, {first['adapted_layers']} adapted layers, {first['quantized_params']:,} quantized weight elements, "
        f"LoRA r={first['r']}, {first['bits']}-bit group {first['group_size']}, fp32; "
        f"{len(by_config[first['config']])} run(s) per configuration (mean).",
        "",
        "| configuration | RSS before step (MiB) | first step: peak - before (MiB) | steady step: peak - before (MiB) "
        "| peak RSS, steady step (MiB) | extra bytes / quantized param vs plain (first / steady) | s/step (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        if config not in by_config:
            continue
        extra = "-"
        if config != "plain" and "plain" in by_config:
            n = by_config[config][0]["quantized_params"]
            extra_first = (mean(config, "first_step", "delta") - mean("plain", "first_step", "delta")) / n
            extra_steady = (mean(config, "steady_step", "delta") - mean("plain", "steady_step", "delta")) / n
            extra = f"{extra_first:.1f} / {extra_steady:.1f}"
        lines.append(
            f"| {LABELS[config]} | {mib(mean(config, 'first_step', 'rss_before'))} | "
            f"{mib(mean(config, 'first_step', 'delta'))} | {mib(mean(config, 'steady_step', 'delta'))} | "
            f"{mib(mean(config, 'steady_step', 'peak'))} | {extra} | {mean(config, 'steady_step', 'seconds'):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    parser.add_argument(
        "--warmup", type=int, default=1, help="steps between the first and the measured later ones"
    )
    parser.add_argument(
        "--measure-steps",
        type=int,
        default=4,
        help="later steps measured one by one; the largest counts (LOTION's curvature runs every 4th step)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=65536,
        help="MALLOC_MMAP_THRESHOLD_ for the children (bytes; 0 leaves glibc's default)",
    )
    parser.add_argument("--smoke", action="store_true", help="a small model, seconds")
    parser.add_argument("--out", default=None)
    parser.add_argument("--summarize", metavar="JSONL", help="only print the table of saved runs")
    parser.add_argument("--child", choices=("build", "measure"), help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as handle:
            print(table([json.loads(line) for line in handle if line.strip()]))
        return
    if args.child == "build":
        child_build(args)
        return
    if args.child == "measure":
        child_measure(args)
        return
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.vocab, args.seq_len = 128, 384, 2, 256, 64
        args.heads, args.rank = 4, 4
        args.out = args.out or os.path.join(tempfile.gettempdir(), "lora_memory_smoke.jsonl")
    args.out = args.out or "lora_memory.jsonl"
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        run_child("build", args)
        for _ in range(args.repeats):
            for config in args.configs:
                record = run_child("measure", args, config) | {"mmap_threshold": args.mmap_threshold}
                records.append(record)
                print(
                    f"{config}: first step +{mib(record['first_step']['delta'])} MiB, "
                    f"steady +{mib(record['steady_step']['delta'])} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")
    print(table(records))
    print(f"\nWall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
