"""The `hf-lotion` command line: a thin layer over the library's API."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Sequence

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


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
        if kernels.triton_can_run(device):
            return f"triton on CUDA ({kernels.ENV_VAR}={backend})"
        return "reference (the GPU's compute capability is below 7.0)"
    return f"reference on CPU ({kernels.ENV_VAR}={backend}; Triton runs on CPU only in its interpreter)"


def cmd_env(args: argparse.Namespace) -> int:
    """Print what hf-lotion runs on: versions, devices, and whether "lotion" is registered."""
    import torch
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    import hf_lotion

    rows = [("hf-lotion", hf_lotion.__version__), ("python", platform.python_version())]
    rows += [(name, _version(name)) for name in PACKAGES]
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    rows += [("cuda", cuda), ("quant_method 'lotion' registered", str("lotion" in AUTO_QUANTIZER_MAPPING))]
    rows += [("kernels", _kernel_summary(torch)), ("QAT methods", ", ".join(hf_lotion.method_names()))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-lotion",
        description="Quantization-aware training (LOTION, StableQAT, STE) for Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version('hf-lotion')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="show versions, devices and registration status")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as error:  # bad user input (settings, files): the message says what and what is allowed
        print(f"hf-lotion: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
