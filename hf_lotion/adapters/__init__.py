"""PEFT adapters on hf_lotion models: QAT adapters on latent layers, adapters over packed bases.

peft is imported by hf_lotion only when the user imports it: `install_peft_integration()` (run by
`import hf_lotion`) wires hf_lotion's LoRA layers in at once if peft is loaded, or right after peft's own
import otherwise, so plain `peft.get_peft_model(model, LoraConfig(...))` gives QAT adapters either way.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Iterator

logger = logging.getLogger(__name__)
# Set inside `requantizing_merge()`; read by PackedLoraLinear.merge.
_requantizing_merge_allowed = False


def _install_now() -> None:
    """Wire the LoRA layers into peft (idempotent); a failure warns, it never breaks an import."""
    try:
        from . import peft_glue

        peft_glue.install()
    except Exception as error:
        logger.warning(
            "hf_lotion could not wire its LoRA layers into peft (%s): %s", type(error).__name__, error
        )


def requantizing_merge_allowed() -> bool:
    return _requantizing_merge_allowed


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Runs `_install_now` right after the `peft` package has finished importing.

    It stays on `sys.meta_path` until then: `importlib.util.find_spec("peft")` (an availability check, as
    transformers does) also asks the finders, and that spec is thrown away without an import.
    """

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._searching:
            return None
        self._searching = True  # the other finders locate peft; this one steps aside meanwhile
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _install_now()

        spec.loader.exec_module = exec_module
        return spec


def install_peft_integration() -> None:
    """Make peft's LoRA use hf_lotion's layers on hf_lotion models (now, or when peft gets imported)."""
    if "peft" in sys.modules:
        if sys.modules["peft"] is not None:  # None: marked as not installed
            _install_now()
    elif importlib.util.find_spec("peft") is not None and not any(
        isinstance(finder, _AfterPeftImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterPeftImport())


@contextlib.contextmanager
def requantizing_merge() -> Iterator[None]:
    """Allow merging adapters into a packed base inside the block; it re-quantizes `dequantize(W) + s B A`.

    The merged model then differs from the adapter model by the new rounding (QAT adapters on the latent model
    merge exactly instead).

    Example:
        >>> with hf_lotion.requantizing_merge():  # doctest: +SKIP
        ...     merged = peft_model.merge_and_unload()
    """
    global _requantizing_merge_allowed
    previous, _requantizing_merge_allowed = _requantizing_merge_allowed, True
    try:
        yield
    finally:
        _requantizing_merge_allowed = previous


__all__ = ["install_peft_integration", "requantizing_merge"]
