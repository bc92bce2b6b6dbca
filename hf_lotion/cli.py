"""The `hf-lotion` command implementations: a thin layer over the library's API.

The console script is `hf_lotion_cli.main` (a top-level module outside this package), which parses the
command line without importing torch and imports this module only when a subcommand runs. `main` and
`build_parser` are re-exported here, so ``python -m hf_lotion.cli`` and `hf_lotion.cli.main` keep working
(they import the library first, as anything under `hf_lotion` does).

Each ``cmd_<name>(args) -> int`` is named by a `hf_lotion_cli.Command`; see that module to add one.

Example:

    >>> from hf_lotion.cli import main
    >>> main(["env"])  # doctest: +SKIP
    hf-lotion                         0.1.0
    ...
"""

from __future__ import annotations

import argparse
import platform
import sys

from hf_lotion_cli import build_parser, main, package_version

__all__ = ["build_parser", "cmd_env", "cmd_export", "main"]

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "triton",
    "bitsandbytes",
)


def _kernel_summary(torch) -> str:
    """Which path the quantized ops take on this machine's default device, and why."""
    from hf_lotion import kernels

    backend = kernels.requested_backend()
    if backend == "reference":
        return f"reference ({kernels.ENV_VAR}=reference)"
    if not kernels.dispatch.triton_installed():
        return "reference (triton is not installed)"
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        if not kernels.triton_can_run(device):
            return "reference (the GPU's compute capability is below 7.0)"
        if backend == "triton" or kernels.dispatch.KERNELS_VERIFIED_ON_GPU:
            return f"triton on CUDA ({kernels.ENV_VAR}={backend})"
        return (
            f"reference ({kernels.ENV_VAR}=auto: the kernels are not yet verified on a GPU; "
            f"{kernels.ENV_VAR}=triton opts in)"
        )
    return f"reference on CPU ({kernels.ENV_VAR}={backend}; Triton runs on CPU only in its interpreter)"


def _cpu_packed_summary(torch) -> str:
    """Which path packed layers take on CPU."""
    from hf_lotion import kernels

    if not kernels.cpu_int4.ops_available():
        return f"dequantize + F.linear (torch {torch.__version__} has no CPU int4 ops)"
    if kernels.requested_backend() != "auto":
        return f"dequantize + F.linear ({kernels.ENV_VAR}={kernels.requested_backend()})"
    int4 = ", ".join(
        f"{str(dtype).removeprefix('torch.')} up to {rows} rows"
        for dtype, rows in kernels.cpu_int4.MAX_KERNEL_ROWS.items()
        if rows
    )
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch's int4 kernel for 2/3/4 bits ({int4}; {capability}), else dequantize + F.linear"


def cmd_env(args: argparse.Namespace) -> int:
    """Print what hf-lotion runs on: versions, devices, and whether "lotion" is registered."""
    import torch
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    import hf_lotion

    rows = [("hf-lotion", hf_lotion.__version__), ("python", platform.python_version())]
    rows += [(name, package_version(name)) for name in PACKAGES]
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    rows += [("cuda", cuda), ("quant_method 'lotion' registered", str("lotion" in AUTO_QUANTIZER_MAPPING))]
    rows += [("kernels", _kernel_summary(torch)), ("packed layers on CPU", _cpu_packed_summary(torch))]
    rows += [("QAT methods", ", ".join(hf_lotion.method_names()))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Push a saved, converted model folder to the Hub; one line, no traceback, when it fails."""
    from hf_lotion.cards.push import PushError, push_to_hub

    try:
        url = push_to_hub(
            args.directory,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.message,
            allow_latent=args.allow_latent,
            create_pr=args.create_pr,
        )
    except PushError as error:
        if args.debug:
            raise
        print(f"hf-lotion: error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.directory} to {url}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Load a saved QAT model folder (and its tokenizer, if any) and export it (`hf_lotion.export_gguf`)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_lotion

    directory = Path(args.directory)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"directory={str(directory)!r} has no config.json; allowed: a save_pretrained folder."
        )
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        tokenizer = None  # export_gguf says what that means
    out = hf_lotion.export_gguf(
        model,
        args.output,
        tokenizer=tokenizer,
        unquantized=args.unquantized,
        tokenizer_pre=args.tokenizer_pre,
        ternary=args.ternary,
    )
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
