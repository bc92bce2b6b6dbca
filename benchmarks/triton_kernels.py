"""GPU benchmarks of the Triton kernels against the PyTorch reference, on Llama-8B shapes (bf16).

    python benchmarks/triton_kernels.py                          # every section, on a CUDA GPU
    python benchmarks/triton_kernels.py --sections fake_quant packed_linear --out results.jsonl
    python benchmarks/triton_kernels.py --smoke                  # tiny shapes on CPU (Triton interpreter): script check

Sections (targets from the kernels issue in brackets):

* `bandwidth`: achievable HBM bandwidth, measured as a 1 GiB device-to-device copy; with the nominal figure
  of known GPUs, the denominators of "% of peak".
* `fake_quant`: fake-quant forward + backward (4 bits, group 128): StableQAT with learned scales (weight and
  LSQ scale gradients) and STE with absmax scales. Triton vs the eager reference vs `torch.compile` of the
  reference; time, effective GB/s over the minimum traffic, % of peak [>= 70% of HBM bandwidth].
* `lotion_step`: LOTION's penalty gradient added to a weight gradient (fp32 master weights), fused vs reference.
* `packed_linear`: packed int4 g128 linear vs bf16 `F.linear` at M = 1, 16, 128, 2048
  [int4 M=1 >= 2.5x faster than bf16 on 4096x14336].
* `qat_step`: one training step (forward, backward, AdamW) of a 1B-class Llama layer stack, per method,
  against bf16 training of the same stack [overhead <= 1.10x].

Timing: `triton.testing.do_bench` (median, L2 flushed between repetitions). `--smoke` runs everything on
tiny shapes with wall-clock timers instead: the figures mean nothing, it checks that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    # The interpreter must be chosen before triton is imported (only where there is no GPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from hf_lotion import kernels, quant  # noqa: E402
from hf_lotion.nn import LotionLinear, PackedLinear  # noqa: E402
from hf_lotion.quant import QuantSpec  # noqa: E402

# (out_features, in_features) of Llama-3-8B's linears: attention, MLP up/gate, MLP down.
LLAMA8B_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
SMOKE_SHAPES = [(48, 64), (96, 64)]
# Nominal HBM bandwidth (bytes/s) by device-name substring, most specific first.
NOMINAL_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
]
SECTIONS = ("bandwidth", "fake_quant", "lotion_step", "packed_linear", "qat_step")


def bench(fn, grad_to_none=None) -> float:
    """Median milliseconds per call."""
    if SMOKE:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    def __init__(self, out: str | None, device: torch.device) -> None:
        self.out, self.device = out, device
        self.name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        print(f"\n### {title} ({self.name})\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")
        if self.out:
            with open(self.out, "a") as f:
                for row in rows:
                    f.write(
                        json.dumps(
                            {"section": title, "device": self.name, **dict(zip(header, row, strict=True))}
                        )
                        + "\n"
                    )
        sys.stdout.flush()


def peak_bandwidth(device: torch.device, report: Report) -> tuple[float, float | None]:
    """(measured copy bandwidth, nominal bandwidth or None), bytes/s."""
    numel = (1 << 30) // 4 if not SMOKE else 1 << 16
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    measured = 2 * src.numel() * 4 / (ms * 1e-3)
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH if key in report.name), None)
    report.table(
        "bandwidth",
        ["copy GiB", "ms", "measured GB/s", "nominal GB/s"],
        [[numel * 4 / 2**30, ms, measured / 1e9, "n/a" if nominal is None else nominal / 1e9]],
    )
    return measured, nominal


def _percent(bytes_moved: float, ms: float, peaks: tuple[float, float | None]) -> tuple[float, str, str]:
    rate = bytes_moved / (ms * 1e-3)
    measured, nominal = peaks
    return (
        rate / 1e9,
        f"{100 * rate / measured:.0f}%",
        "n/a" if nominal is None else f"{100 * rate / nominal:.0f}%",
    )


def bench_fake_quant(shapes, device, peaks, report: Report) -> None:
    bits, group, dtype = 4, 128 if not SMOKE else 32, torch.bfloat16
    # In --smoke runs (CPU) only the tracing is checked: aot_eager skips the C++ code generation.
    compiled_fq = torch.compile(
        quant.fake_quantize, dynamic=False, backend="aot_eager" if SMOKE else "inductor"
    )
    rows = []
    for out_features, in_features in shapes:
        w = (torch.randn(out_features, in_features, device=device) * 0.02).to(dtype).requires_grad_()
        dy = torch.randn_like(w)
        for variant, amplitudes, learned in (("stableqat+LSQ", (0.21,), True), ("ste absmax", (), False)):
            learned_scales = kernels.absmax_scales(w, bits, group).requires_grad_() if learned else None

            def step(fq, absmax_fn, w=w, dy=dy, amplitudes=amplitudes, learned_scales=learned_scales):
                scales = learned_scales if learned_scales is not None else absmax_fn(w, bits, group)
                fq(w, scales, bits, group, amplitudes).backward(dy)

            grads = [w, learned_scales] if learned else [w]
            # Minimum traffic: forward reads w, writes w_hat; backward reads w and dy, writes dw.
            n_groups = w.numel() // group
            scale_bytes = n_groups * 2 * (3 if learned else 2)
            minimum = 5 * w.numel() * w.element_size() + scale_bytes
            impls = {
                "triton": (kernels.fake_quantize, kernels.absmax_scales, "triton"),
                "eager reference": (quant.fake_quantize, quant.absmax_scales, "reference"),
                "torch.compile reference": (compiled_fq, quant.absmax_scales, "reference"),
            }
            times = {}
            for impl, (fq, absmax_fn, backend) in impls.items():
                with kernels.kernel_backend(backend):
                    times[impl] = bench(
                        lambda fq=fq, absmax_fn=absmax_fn: step(fq, absmax_fn), grad_to_none=grads
                    )
            for impl, ms in times.items():
                gbps, of_measured, of_nominal = _percent(minimum, ms, peaks)
                speedup = times["eager reference"] / ms
                rows.append(
                    [
                        f"{out_features}x{in_features}",
                        variant,
                        impl,
                        ms * 1e3,
                        gbps,
                        of_measured,
                        of_nominal,
                        speedup,
                    ]
                )
    report.table(
        "fake_quant fwd+bwd (4 bit, g128, bf16)",
        ["shape", "variant", "impl", "us", "GB/s", "% of copy", "% of nominal", "x vs eager"],
        rows,
    )


def bench_lotion_step(shapes, device, peaks, report: Report) -> None:
    from hf_lotion.quant.lotion import add_penalty_grad

    bits, group = 4, 128 if not SMOKE else 32
    rows = []
    for out_features, in_features in shapes:
        w = torch.randn(out_features, in_features, device=device) * 0.02
        scales = quant.absmax_scales(w, bits, group)
        grad = torch.randn_like(w) * 1e-4
        curvature = torch.rand_like(w) * 1e-6
        multiplier = torch.tensor(0.25, device=device)

        def fused(w=w, scales=scales, grad=grad, curvature=curvature, m=multiplier):
            kernels.add_lotion_penalty_grad(grad, w, scales, curvature, bits, group, 0.5, m)

        def reference(w=w, scales=scales, grad=grad, curvature=curvature, m=multiplier):
            add_penalty_grad(grad, w, scales, curvature, bits, group, 0.5, m)

        with kernels.kernel_backend("triton"):
            fused_ms = bench(fused)
        reference_ms = bench(reference)
        minimum = 4 * w.numel() * 4  # read w, grad, curvature; write the new grad (fp32)
        for impl, ms in (("triton fused", fused_ms), ("eager reference", reference_ms)):
            gbps, of_measured, of_nominal = _percent(minimum, ms, peaks)
            rows.append(
                [
                    f"{out_features}x{in_features}",
                    impl,
                    ms * 1e3,
                    gbps,
                    of_measured,
                    of_nominal,
                    reference_ms / ms,
                ]
            )
    report.table(
        "LOTION penalty gradient (fp32 master weights)",
        ["shape", "impl", "us", "GB/s", "% of copy", "% of nominal", "x vs eager"],
        rows,
    )


def bench_packed_linear(shapes, device, report: Report) -> None:
    bits, group, dtype = 4, 128 if not SMOKE else 32, torch.bfloat16
    batch_sizes = (1, 16, 128, 2048) if not SMOKE else (1, 16)
    rows = []
    for out_features, in_features in shapes:
        linear = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        qat = LotionLinear.from_linear(linear, QuantSpec(bits=bits, group_size=group)).eval()
        packed = PackedLinear.from_qat(qat)
        weight = linear.weight.detach()
        for m in batch_sizes:
            x = torch.randn(m, in_features, device=device, dtype=dtype)
            dense_ms = bench(lambda x=x, weight=weight: F.linear(x, weight))
            with kernels.kernel_backend("triton"):
                packed_ms = bench(lambda x=x, packed=packed: packed(x))
            with kernels.kernel_backend("reference"):
                reference_ms = bench(lambda x=x, packed=packed: packed(x))
            path = "gemv" if m <= kernels.packed_matmul.GEMV_MAX_M else "dequant+cuBLAS"
            rows.append(
                [f"{out_features}x{in_features}", m, path, dense_ms * 1e3, packed_ms * 1e3, dense_ms / packed_ms,
                 reference_ms * 1e3]
            )  # fmt: skip
    report.table(
        "packed int4 g128 linear vs bf16 F.linear",
        ["shape", "M", "path", "bf16 us", "int4 triton us", "speedup", "int4 reference us"],
        rows,
    )


def bench_qat_step(device, report: Report, steps: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_lotion
    from hf_lotion import LotionConfig

    if SMOKE:
        config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        batch, seq, group = 2, 16, 32
    else:
        # Llama-3.2-1B's layer stack (16 layers, hidden 2048, MLP 8192, GQA 32/8); a small vocabulary so the
        # step time is the quantized linears', not the 128k embedding's.
        config = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
        batch, seq, group = 4, 1024, 128
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inputs = {"input_ids": ids, "labels": ids}
    variants = {
        "bf16": None,
        "ste": dict(method="ste"),
        "stableqat": dict(method="stableqat"),
        "lotion": dict(method="lotion"),
    }
    rows, baseline = [], None
    for name, options in variants.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
        if options is not None:
            hf_lotion.prepare(model, LotionConfig(bits=4, group_size=group, **options))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

        def train_step(model=model, optimizer=optimizer):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with kernels.kernel_backend("triton"):
            for _ in range(2):
                train_step()
            sync(device)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                train_step()
                sync(device)
                times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        baseline = baseline or ms
        rows.append([name, ms, ms / baseline])
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.table(
        f"QAT step, {config.num_hidden_layers}-layer Llama stack (hidden {config.hidden_size}), batch {batch}x{seq}, 4 bit",
        ["method", "ms/step", "x bf16"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--shapes", nargs="+", help="OUTxIN weight shapes (default: Llama-8B's)")
    parser.add_argument("--steps", type=int, default=10, help="timed QAT steps per method")
    parser.add_argument("--out", help="append results as JSON lines to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, wall-clock timers, CPU allowed")
    args = parser.parse_args(argv)

    if SMOKE and not torch.cuda.is_available():
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("needs a CUDA GPU (or --smoke to check the script on CPU)")
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            parser.error(f"--shapes takes OUTxIN pairs such as 4096x14336, got {args.shapes}")
    else:
        shapes = SMOKE_SHAPES if SMOKE else LLAMA8B_SHAPES

    report = Report(args.out, device)
    print(f"# hf-lotion kernel benchmarks on {report.name}, torch {torch.__version__}")
    peaks = peak_bandwidth(device, report)
    if "fake_quant" in args.sections:
        bench_fake_quant(shapes, device, peaks, report)
    if "lotion_step" in args.sections:
        bench_lotion_step(shapes, device, peaks, report)
    if "packed_linear" in args.sections:
        bench_packed_linear(shapes, device, report)
    if "qat_step" in args.sections:
        bench_qat_step(device, report, 2 if SMOKE else args.steps)


if __name__ == "__main__":
    main()
