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
_installed = False


def _install_now() -> None:
    global _installed
    if _installed:
        return
    from . import peft_glue

    peft_glue.install()
    _installed = True


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
            try:
                _install_now()
            except Exception as error:  # never break `import peft` itself
                logger.warning(
                    "hf_lotion could not wire its LoRA layers into peft (%s): %s", type(error).__name__, error
                )

        spec.loader.exec_module = exec_module
        return spec


def install_peft_integration() -> None:
    """Make peft's LoRA use hf_lotion's layers on hf_lotion models (now, or when peft gets imported)."""
    if "peft" in sys.modules:
        if sys.modules["peft"] is not None:  # None: marked as not installed
            try:
                _install_now()
            except Exception as error:  # hf_lotion stays importable whatever peft version is loaded
                logger.warning(
                    "hf_lotion could not wire its LoRA layers into peft (%s): %s", type(error).__name__, error
                )
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
    from . import lora

    with lora.requantizing_merge():
        yield


__all__ = ["install_peft_integration", "requantizing_merge"]
