"""The `hf-lotion` command line, and what importing costs.

`hf-lotion --help`, `--version` and usage errors must answer without importing torch or transformers
(importing `hf_lotion` takes seconds); subcommands import the library when they run. Importing the
trainer must not drag in bitsandbytes, whose import is slow and logs warnings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import hf_lotion_cli

REPO = Path(__file__).resolve().parents[1]
# Runs a console script (a Python file) in this interpreter, then reports which heavy modules it imported.
RUN_SCRIPT_AND_REPORT = """
import json, runpy, sys
script, *args = sys.argv[1:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as exit_:
    code = exit_.code
imported = sorted(name for name in ("torch", "transformers") if name in sys.modules)
sys.stderr.write("\\nIMPORTED " + json.dumps(imported) + "\\n")
sys.exit(code)
"""


def _installed_script() -> str:
    try:
        importlib.metadata.distribution("hf-lotion")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("hf-lotion is not installed in this environment (run: pip install -e .)")
    script = shutil.which("hf-lotion") or str(Path(sys.executable).parent / "hf-lotion")
    if not Path(script).is_file():
        pytest.skip(f"no hf-lotion console script at {script}")
    return script


def _run(command: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    return result, time.perf_counter() - start


def test_installed_console_script_matches_pyproject():
    """The script under test is the one pyproject declares (a stale editable install would test old code)."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["hf-lotion"]
    _installed_script()
    (installed,) = importlib.metadata.entry_points(group="console_scripts", name="hf-lotion")
    assert installed.value == declared, "reinstall: pip install -e . --no-deps"


@pytest.mark.parametrize(
    ("args", "returncode", "expected"),
    [
        (["--help"], 0, "env       show versions, devices and registration status"),
        ([], 0, "usage: hf-lotion"),
        (["--version"], 0, f"hf-lotion {importlib.metadata.version('hf-lotion')}"),
        (["--no-such-option"], 2, "hf-lotion: error: unrecognized arguments: --no-such-option"),
        (["no-such-command"], 2, "invalid choice: 'no-such-command'"),
    ],
)
def test_console_script_answers_without_importing_torch(args, returncode, expected):
    script = _installed_script()

    result, seconds = _run([script, *args])
    assert result.returncode == returncode, result.stderr
    assert expected in result.stdout + result.stderr
    if args == ["--version"]:
        assert result.stdout == f"{expected}\n"

    report, _ = _run([sys.executable, "-c", RUN_SCRIPT_AND_REPORT, script, *args])
    assert report.returncode == returncode, report.stderr
    imported = json.loads(report.stderr.rpartition("IMPORTED ")[2])
    assert imported == [], f"`hf-lotion {' '.join(args)}` imported {imported} (it took {seconds:.1f} s)"
    # Generous: a bare interpreter starts in well under a second; importing torch and transformers takes seconds.
    assert seconds < 3.0, f"`hf-lotion {' '.join(args)}` took {seconds:.1f} s"


def test_parser_builds_without_the_library_and_names_library_commands():
    parser = hf_lotion_cli.build_parser()
    # positional arguments of commands that take some
    required = {"push": ["out", "me/model"], "export": ["out", "model.gguf"]}
    for command in hf_lotion_cli.COMMANDS:
        args = parser.parse_args([command.name, *required.get(command.name, [])])
        assert args.command == command.name and args.target == command.target
        module, _, function = command.target.partition(":")
        assert module.startswith("hf_lotion."), f"{command.name}: implementations live in the library"
        assert callable(getattr(importlib.import_module(module), function)), command.target


def test_version_is_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as exit_info:
        hf_lotion_cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"hf-lotion {importlib.metadata.version('hf-lotion')}\n"


def test_value_errors_from_a_command_exit_2_with_the_message(monkeypatch, capsys):
    def fails(args: argparse.Namespace) -> int:
        raise ValueError("bits=3 is not supported; allowed: 2, 4, 8")

    module = types.ModuleType("fake_commands")
    module.fails = fails
    monkeypatch.setitem(sys.modules, "fake_commands", module)
    monkeypatch.setattr(
        hf_lotion_cli, "COMMANDS", (hf_lotion_cli.Command("fail", "fails", "fake_commands:fails"),)
    )
    assert hf_lotion_cli.main(["fail"]) == 2
    assert capsys.readouterr().err == "hf-lotion: error: bits=3 is not supported; allowed: 2, 4, 8\n"


def test_env_through_the_package_entry_point(capsys):
    """`hf_lotion.cli.main` (and so `python -m hf_lotion.cli`) is the same command line."""
    import hf_lotion
    from hf_lotion.cli import main

    assert main is hf_lotion_cli.main
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "quant_method 'lotion' registered  True" in out
    assert f"hf-lotion                         {hf_lotion.__version__}" in out
    assert "QAT methods                       full_precision, lotion, stableqat, ste" in out


@pytest.mark.parametrize(
    "backend,expected",
    [
        ("auto", "torch's int4 kernel for 2/3/4 bits"),
        ("reference", "dequantize + F.linear (HF_LOTION_KERNELS=reference)"),
    ],
    ids=["auto", "reference"],
)
def test_env_says_which_path_packed_layers_take_on_cpu(backend, expected, capsys, monkeypatch):
    from hf_lotion.kernels import cpu_int4

    if not cpu_int4.ops_available():
        pytest.skip("this torch build has no CPU int4 ops")
    monkeypatch.setenv("HF_LOTION_KERNELS", backend)
    assert hf_lotion_cli.main(["env"]) == 0
    assert f"packed layers on CPU              {expected}" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_env_imports_the_library():
    result, _ = _run([_installed_script(), "env"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "quant_method 'lotion' registered  True" in result.stdout
    assert "QAT methods" in result.stdout and "lotion" in result.stdout


@pytest.mark.slow
def test_python_m_hf_lotion_cli():
    result, _ = _run([sys.executable, "-m", "hf_lotion.cli", "--version"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hf-lotion {importlib.metadata.version('hf-lotion')}\n"


# --- What importing the trainer costs ------------------------------------------------------------------

IMPORT_TRAINER = """
import sys
{prelude}
import hf_lotion
import transformers
from hf_lotion import LotionTrainer
assert issubclass(LotionTrainer, transformers.Trainer)
print("bitsandbytes" in sys.modules)
"""


def _imports_bitsandbytes(code: str) -> bool:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1] == "True"


def test_hf_lotion_and_its_trainer_do_not_import_bitsandbytes():
    """Neither hf-lotion nor transformers' Trainer imports bitsandbytes; peft is hidden (see the next test)."""
    # `sys.modules["peft"] = None` makes transformers see peft as not installed.
    assert not _imports_bitsandbytes(IMPORT_TRAINER.format(prelude='sys.modules["peft"] = None'))


def test_importing_the_trainer_does_not_import_bitsandbytes():
    """bitsandbytes loads only when a bnb optimizer or layer is used (`optim="adamw_bnb_8bit"` imports it)."""
    pytest.importorskip("peft")
    if _imports_bitsandbytes("import sys, peft; print('bitsandbytes' in sys.modules)"):
        # transformers.Trainer -> transformers.trainer_utils imports peft at module level whenever peft is
        # installed, and peft >= 0.20 imports bitsandbytes in peft/helpers.py at module level.
        pytest.xfail(
            f"peft {importlib.metadata.version('peft')} imports bitsandbytes eagerly (peft/helpers.py)"
        )
    assert not _imports_bitsandbytes(IMPORT_TRAINER.format(prelude=""))
