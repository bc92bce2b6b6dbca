"""The `hf-lotion` console script: argument parsing only, so that `--help`, `--version` and usage errors
answer in a fraction of a second.

This module deliberately lives outside the `hf_lotion` package. Importing anything under `hf_lotion` runs
the package's `__init__`, which imports torch and transformers and registers quant_method "lotion" with
transformers (seconds, and it must stay that way for `import hf_lotion` to keep its meaning). Here nothing
imports torch: each subcommand names its implementation as ``"module:function"``, and that module is
imported only when the subcommand runs.

Adding a subcommand (``train``, ``push``, ``export``, ...):

1. implement ``cmd_<name>(args: argparse.Namespace) -> int`` in `hf_lotion.cli` (it may import anything;
   it raises ValueError, naming the field, the value and what is allowed, for bad user input);
2. add a `Command` to `COMMANDS` below, whose ``add_arguments`` uses argparse only. Choices that come from
   the library (method names, bit widths) are validated by the library, not listed here.

Example:

    >>> from hf_lotion_cli import build_parser
    >>> args = build_parser().parse_args(["env"])
    >>> args.command, args.target
    ('env', 'hf_lotion.cli:cmd_env')
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "build_parser", "main", "package_version"]

PROG = "hf-lotion"
DESCRIPTION = "Quantization-aware training (LOTION, StableQAT, STE) for Hugging Face transformers."


@dataclass(frozen=True)
class Command:
    """One subcommand: how to parse it (here, without torch) and where it is implemented (imported on use).

    Example:

        >>> Command("env", "show versions", "hf_lotion.cli:cmd_env").target
        'hf_lotion.cli:cmd_env'
    """

    name: str
    help: str
    target: (
        str  # "module:function"; the function takes the parsed argparse.Namespace and returns an exit code
    )
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a folder written by save_pretrained after hf_lotion.convert")
    parser.add_argument("repo_id", help="the Hub repository, namespace/name")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", action="store_true", default=None, help="create the repository private"
    )
    visibility.add_argument("--public", dest="private", action="store_false", help="create it public")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument(
        "--allow-latent", action="store_true", help="publish a model still in the latent (training) format"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback when the push fails")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", help="a folder written by save_pretrained of a QAT model (latent or converted)"
    )
    parser.add_argument("output", help="the file to write, e.g. model-Q4_0.gguf")
    parser.add_argument(
        "--format",
        choices=["gguf"],
        default="gguf",
        help="gguf: one llama.cpp file, quantized layers exact as Q4_0/Q8_0 (the compressed-tensors export "
        "is hf_lotion.export_compressed_tensors in Python)",
    )
    parser.add_argument(
        "--unquantized",
        choices=["f16", "f32", "q8_0"],
        default="f16",
        help="type of the token embedding and an unquantized output head (default f16; q8_0 is llama.cpp's "
        "own rounding, the convention for QAT uploads)",
    )
    parser.add_argument(
        "--ternary",
        choices=["q4_0", "tq2_0"],
        default="q4_0",
        help="2-bit layers as Q4_0 (default) or TQ2_0 (levels -1, 0, 1 only, groups a multiple of 256)",
    )
    parser.add_argument(
        "--tokenizer-pre", help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), if not detected"
    )


COMMANDS: tuple[Command, ...] = (
    Command("env", "show versions, devices and registration status", "hf_lotion.cli:cmd_env"),
    Command(
        "push",
        "publish a converted model folder (model, tokenizer, card, plots) to the Hub in one commit; the token "
        "comes from HF_TOKEN or `hf auth login`",
        "hf_lotion.cli:cmd_push",
        _push_arguments,
    ),
    Command(
        "export",
        "write a saved QAT model as one GGUF file for llama.cpp, keeping the trained low-bit weights exactly",
        "hf_lotion.cli:cmd_export",
        _export_arguments,
    ),
)


def package_version(package: str) -> str:
    """The installed version of `package` from its metadata (nothing is imported), or "not installed".

    Example:

        >>> package_version("surely-not-an-installed-package")
        'not installed'
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked for, then exits like argparse's own action."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog} {package_version('hf-lotion')}")  # on stdout, as argparse's own action does
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The full `hf-lotion` argument parser; building it imports neither torch nor `hf_lotion`.

    Example:

        >>> parser = build_parser()
        >>> parser.prog
        'hf-lotion'
        >>> parser.parse_args([]).command is None
        True
    """
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument(
        "--version", action=_VersionAction, help="show the installed hf-lotion version and exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(sub)
        sub.set_defaults(target=command.target)
    return parser


def _load(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-lotion` with `argv` (default: ``sys.argv[1:]``) and return the exit code.

    ``--help``, ``--version`` and usage errors exit (SystemExit) before the library is imported; a
    subcommand imports its implementation, and a ValueError from it (bad settings or files) is printed as
    ``hf-lotion: error: ...`` with exit code 2.

    Example:

        >>> main(["--version"])  # doctest: +SKIP
        hf-lotion 0.1.0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    run = _load(args.target)
    try:
        return run(args)
    except ValueError as error:  # bad user input (settings, files): the message says what and what is allowed
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
