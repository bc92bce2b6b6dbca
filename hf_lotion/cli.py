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


def cmd_env(args: argparse.Namespace) -> int:
    """Print what hf-lotion runs on: versions, devices, and whether "lotion" is registered."""
    import torch
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    import hf_lotion

    rows = [("hf-lotion", hf_lotion.__version__), ("python", platform.python_version())]
    rows += [(name, _version(name)) for name in PACKAGES]
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    rows += [("cuda", cuda), ("quant_method 'lotion' registered", str("lotion" in AUTO_QUANTIZER_MAPPING))]
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
