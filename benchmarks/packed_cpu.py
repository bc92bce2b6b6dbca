"""Packed models on CPU: per-layer matmul time, the kernel/dequantize crossover, `generate` tokens/s, memory.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/packed_cpu.py [--quick]
Appends to benchmarks/results/packed_cpu.jsonl (one row per measurement); `--report` prints the last run's
tables as markdown (what benchmarks/RESULTS.md records).

* per layer: `PackedLinear` on the CPU int4 kernel (`auto`; products of up to 8M multiply-adds on one thread
  under OMP_WAIT_POLICY=PASSIVE, `cpu_int4.run_kernel`), the same layer on the reference path
  (dequantize the kernel's copy + `F.linear`), the path before the kernel (unpack int32 words + dequantize +
  `F.linear`, every call), and dense `F.linear` in bf16 and fp32; M = 1, 8, 128 rows; interleaved rounds,
  median of each.
* crossover: kernel vs dequantize + `F.linear` for M = 1 .. 512, per activation dtype: where the second
  wins is what `hf_lotion.kernels.cpu_int4.MAX_KERNEL_ROWS` encodes (and `cpu_int8.MAX_KERNEL_ROWS` for
  bf16 8-bit per-row layers).
* generate: greedy, batch 1, fp32 / bf16 / packed (bf16 and fp32, kernel) / packed (bf16, before the kernel)
  models with the same random weights, in one process, interleaved rounds; a 45M-class Llama and
  SmolLM2-135M's shapes.
* memory: bytes held by the quantized layers (kernel copy and scales) over the same layers in bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_lotion
from hf_lotion.kernels import cpu_int4, cpu_int8, kernel_backend
from hf_lotion.nn import LotionLinear, PackedLinear
from hf_lotion.quant import QuantSpec

RESULTS = Path(__file__).parent / "results" / "packed_cpu.jsonl"

MODELS = {
    # The 45M-class Llama: hidden 1024, 4 layers.
    "llama-45M": LlamaConfig(
        vocab_size=2048,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    ),
    # SmolLM2-135M's shapes (random weights).
    "smollm2-135M-shapes": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
}
GROUP = {"llama-45M": 128, "smollm2-135M-shapes": 64}
PARTS = ["per_layer", "crossover", "generate"]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_ms(paths: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per path over `rounds` interleaved rounds (one warm-up call each)."""
    times = {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():
            fn()
        for _ in range(rounds):
            for name, fn in paths.items():
                times[name].append(median_ms(fn, repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def packed_layer(out_features: int, in_features: int, bits: int, group_size: int, dtype: torch.dtype):
    linear = torch.nn.Linear(in_features, out_features, bias=False).to(dtype)
    qat = LotionLinear.from_linear(linear, QuantSpec(bits=bits, group_size=group_size)).eval()
    words = PackedLinear.from_qat(qat)  # packed int32 words: the path before the CPU kernel
    kernel = PackedLinear.from_qat(qat)
    assert kernel.prepare_cpu_kernel_()
    return words, kernel


def per_layer(shapes, bits: int, rows, rounds: int, repeats: int, emit) -> None:
    for out_features, in_features, group_size in shapes:
        words, kernel = packed_layer(out_features, in_features, bits, group_size, torch.bfloat16)
        dense = {dt: words.dequantized_weight().to(dt) for dt in (torch.bfloat16, torch.float32)}
        for m in rows:
            x = torch.randn(m, in_features, dtype=torch.bfloat16)
            x32 = x.float()
            paths = {
                "kernel (auto)": partial(kernel, x),
                "kernel copy, reference": partial(kernel_reference, kernel, x),
                "before: words + dequantize": partial(words, x),
                "dense bf16 F.linear": partial(F.linear, x, dense[torch.bfloat16]),
                "dense fp32 F.linear": partial(F.linear, x32, dense[torch.float32]),
            }
            row = interleaved_ms(paths, rounds, repeats)
            emit(
                {
                    "kind": "per_layer",
                    "shape": [out_features, in_features],
                    "group_size": group_size,
                    "bits": bits,
                    "m": m,
                    "ms": row,
                }
            )


def dequantize_then_linear(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """What the layer does above the crossover: dequantize its kernel copy once, then F.linear."""
    return F.linear(x, layer.dequantized_weight())


def kernel_reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    with kernel_backend("reference"):
        return layer(x)


def crossover(shapes, bits: int, rows_by_dtype, rounds: int, repeats: int, emit) -> None:
    """Kernel vs dequantize + F.linear (both from the kernel's copy) by row count, per activation dtype."""
    for dtype, rows in rows_by_dtype.items():
        for out_features, in_features, group_size in shapes:
            _, layer = packed_layer(out_features, in_features, bits, group_size, dtype)
            sz = layer.int4_scales_and_zeros
            for m in rows:
                x = torch.randn(m, in_features, dtype=dtype)
                paths = {
                    # What the layer runs: small products on one thread when idle threads sleep.
                    "kernel": partial(
                        cpu_int4.run_kernel,
                        cpu_int4.int4_mm,
                        m * out_features * in_features,
                        x,
                        layer.weight,
                        sz,
                    ),
                    "dequantize + F.linear": partial(dequantize_then_linear, x, layer),
                }
                emit(
                    {
                        "kind": "crossover",
                        "dtype": str(dtype).removeprefix("torch."),
                        "shape": [out_features, in_features],
                        "group_size": group_size,
                        "m": m,
                        "ms": interleaved_ms(paths, rounds, repeats),
                    }
                )


def crossover_int8(shapes, rows, rounds: int, repeats: int, emit) -> None:
    """8-bit per-row bf16 layers: the int8 kernel vs dequantize + F.linear by row count."""
    for out_features, in_features, _ in shapes:
        _, layer = packed_layer(out_features, in_features, 8, -1, torch.bfloat16)
        assert layer.weight.dtype == torch.int8
        row_scales = layer.weight_scale.reshape(-1).contiguous()
        for m in rows:
            x = torch.randn(m, in_features, dtype=torch.bfloat16)
            paths = {
                "kernel": partial(
                    cpu_int4.run_kernel,
                    cpu_int8.int8_mm,
                    m * out_features * in_features,
                    x,
                    layer.weight,
                    row_scales,
                ),
                "dequantize + F.linear": partial(dequantize_then_linear, x, layer),
            }
            emit(
                {
                    "kind": "crossover_int8",
                    "dtype": "bfloat16",
                    "shape": [out_features, in_features],
                    "m": m,
                    "ms": interleaved_ms(paths, rounds, repeats),
                }
            )


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return new_tokens / (time.perf_counter() - start)


def layer_bytes(model) -> tuple[int, int]:
    """(bytes the quantized layers hold, bytes of the same weights in bf16)."""
    held = bf16 = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            tensors = {id(t): t for t in module.buffers(recurse=False)}
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()
            }
            held += sum(storages.values())
            bf16 += module.in_features * module.out_features * 2
    return held, bf16


def generate(name: str, bits: int, new_tokens: int, rounds: int, emit) -> None:
    config = MODELS[name]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "fp32")
        models = {
            "fp32": AutoModelForCausalLM.from_pretrained(tmp / "fp32", dtype=torch.float32),
            "bf16": AutoModelForCausalLM.from_pretrained(tmp / "fp32", dtype=torch.bfloat16),
        }
        qat = AutoModelForCausalLM.from_pretrained(
            tmp / "fp32",
            dtype=torch.bfloat16,
            quantization_config=hf_lotion.LotionConfig(bits=bits, group_size=GROUP[name]),
        )
        hf_lotion.convert(qat).save_pretrained(tmp / "packed")
        models["packed bf16 (kernel)"] = AutoModelForCausalLM.from_pretrained(tmp / "packed")
        models["packed fp32 (kernel)"] = AutoModelForCausalLM.from_pretrained(
            tmp / "packed", dtype=torch.float32
        )
        before = AutoModelForCausalLM.from_pretrained(tmp / "packed")
        for module in before.modules():
            if isinstance(module, PackedLinear):
                module.release_cpu_kernel_()
        models["packed bf16 (before: words)"] = before
        held, bf16_bytes = layer_bytes(models["packed bf16 (kernel)"])
        words_held, _ = layer_bytes(before)
        prompt = torch.randint(1, config.vocab_size, (1, 16))
        rates = {key: [] for key in models}
        for model in models.values():
            model.eval()
            tokens_per_second(model, prompt, 4)  # warm-up
        for _ in range(rounds):
            for key, model in models.items():
                rates[key].append(tokens_per_second(model, prompt, new_tokens))
        emit(
            {
                "kind": "generate",
                "model": name,
                "params_M": round(sum(p.numel() for p in models["fp32"].parameters()) / 1e6, 1),
                "bits": bits,
                "group_size": GROUP[name],
                "new_tokens": new_tokens,
                "tokens_per_s": {key: statistics.median(r) for key, r in rates.items()},
                "quantized_layer_bytes_over_bf16": {
                    "kernel": held / bf16_bytes,
                    "words": words_held / bf16_bytes,
                },
            }
        )


def report(path: Path, run: str | None = None) -> str:
    """Markdown tables of one run recorded in `path` (default: the last)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    run = run or rows[-1]["run"]
    rows = [r for r in rows if r.get("run") == run]
    if not rows:
        raise SystemExit(f"no run {run!r} in {path}")
    out = [
        f"{rows[0]['date']}, torch {rows[0]['torch']}, {rows[0]['cpu_capability']}, {rows[0]['threads']} threads"
    ]
    layer = [r for r in rows if r["kind"] == "per_layer"]
    if layer:
        names = list(layer[0]["ms"])
        out += [
            "",
            "| shape (N x K), group | M | " + " | ".join(f"{n} (ms)" for n in names) + " | bf16 / kernel |",
        ]
        out += ["|---|---|" + "---|" * (len(names) + 1)]
        for r in layer:
            ms = r["ms"]
            ratio = ms["dense bf16 F.linear"] / ms["kernel (auto)"]
            cells = " | ".join(f"{ms[n]:.3f}" for n in names)
            out.append(
                f"| {r['shape'][0]} x {r['shape'][1]}, g{r['group_size']} | {r['m']} | {cells} | {ratio:.2f}x |"
            )
    for kind in ("crossover", "crossover_int8"):
        cross = [r for r in rows if r["kind"] == kind]
        if not cross:
            continue
        out += ["", f"{kind}: kernel ms / dequantize + F.linear ms (the faster in bold)", ""]
        ms_rows = sorted({r["m"] for r in cross})
        keys = list(dict.fromkeys((r["dtype"], tuple(r["shape"])) for r in cross))
        out += [
            "| dtype, shape | " + " | ".join(f"M={m}" for m in ms_rows) + " |",
            "|---|" + "---|" * len(ms_rows),
        ]
        for dtype, shape in keys:
            cells = []
            for m in ms_rows:
                hit = [r for r in cross if r["dtype"] == dtype and tuple(r["shape"]) == shape and r["m"] == m]
                if not hit:
                    cells.append("")
                    continue
                k, d = hit[0]["ms"]["kernel"], hit[0]["ms"]["dequantize + F.linear"]
                cells.append(f"**{k:.3g}** / {d:.3g}" if k < d else f"{k:.3g} / **{d:.3g}**")
            out.append(f"| {dtype}, {shape[0]} x {shape[1]} | " + " | ".join(cells) + " |")
    gen = [r for r in rows if r["kind"] == "generate"]
    if gen:
        names = list(gen[0]["tokens_per_s"])
        out += [
            "",
            "| model | "
            + " | ".join(f"{n} (tok/s)" for n in names)
            + " | packed bf16 / fp32 | quantized layers / bf16 bytes |",
        ]
        out += ["|---|" + "---|" * (len(names) + 2)]
        for r in gen:
            tps = r["tokens_per_s"]
            cells = " | ".join(f"{tps[n]:.1f}" for n in names)
            ratio = tps["packed bf16 (kernel)"] / tps["fp32"]
            memory = r["quantized_layer_bytes_over_bf16"]["kernel"]
            label = f"{r['model']} ({r['params_M']}M, {r['bits']}-bit g{r['group_size']})"
            out.append(f"| {label} | {cells} | {ratio:.2f}x | {memory:.3f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--report", action="store_true", help="print the last run's tables as markdown and exit"
    )
    parser.add_argument("--run", help="with --report: the run to print (its 'run' field; default the last)")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=PARTS, help="what to measure (default: everything)"
    )
    args = parser.parse_args()
    if args.report:
        print(report(RESULTS, args.run))
        return
    rounds, repeats = (1, 3) if args.quick else (5, 10)
    header = {
        "run": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    out = RESULTS.open("a")

    def emit(row: dict) -> None:
        row = header | row
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    shapes = [(4096, 4096, 128), (576, 576, 64), (1536, 576, 64), (576, 1536, 64), (2816, 1024, 128)]
    if "per_layer" in args.parts:
        per_layer(shapes, args.bits, (1, 8, 128), rounds, repeats, emit)
    crossover_shapes = [(4096, 4096, 128), (1536, 576, 64), (576, 1536, 64)]
    # The fp32 kernel is scalar code (about 10x slower than bf16 at M = 1): a few rows settle its crossover.
    rows = {
        torch.bfloat16: (1, 8, 32, 64, 128, 256, 512),
        torch.float16: (1, 8, 32, 64, 128, 256, 512),
        torch.float32: (1, 2, 4, 8),
    }
    if "crossover" in args.parts:
        crossover(crossover_shapes, args.bits, rows, max(rounds // 2, 1), repeats, emit)
        crossover_int8(crossover_shapes, (1, 8, 16, 32, 64, 128), max(rounds // 2, 1), repeats, emit)
    if "generate" in args.parts:
        for name in MODELS:
            generate(name, args.bits, 32, 3 if args.quick else 5, emit)


if __name__ == "__main__":
    main()
