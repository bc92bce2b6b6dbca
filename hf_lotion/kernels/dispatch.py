"""Which implementation runs: the Triton kernels or the plain-PyTorch reference.

An explicit capability check, never a try/except around a launch:

* `HF_LOTION_KERNELS=auto` (default): the reference, on every device, for now. The kernels match the
  reference in Triton's CPU interpreter, but their `gpu` tests and benchmarks have not yet run on a real
  GPU; `auto` switches to Triton on CUDA (compute capability >= 7.0) once they have
  (`KERNELS_VERIFIED_ON_GPU`, with the run recorded in benchmarks/RESULTS.md).
* `HF_LOTION_KERNELS=triton`: always Triton (the opt-in on CUDA today); an error if the tensors cannot run
  it. CPU tensors run only in Triton's interpreter (`TRITON_INTERPRET=1` set before triton is imported),
  which is how the test suite checks the kernels on machines without a GPU.
* `HF_LOTION_KERNELS=reference`: always the reference (for debugging a numerical difference).

The variable is read at every call, so it can be flipped in a running process; `kernel_backend(...)`
does the same for a block of code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

ENV_VAR = "HF_LOTION_KERNELS"
BACKENDS = ("auto", "reference", "triton")
# Triton's oldest supported NVIDIA architecture is Volta.
MIN_CUDA_CAPABILITY = (7, 0)
# Set once the `gpu` tests and benchmarks/triton_kernels.py have passed on real hardware: until then `auto`
# keeps CUDA tensors on the reference, and HF_LOTION_KERNELS=triton opts in.
KERNELS_VERIFIED_ON_GPU = False


def requested_backend() -> str:
    """The backend asked for by `HF_LOTION_KERNELS` (validated)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not supported; allowed: {', '.join(BACKENDS)}.")
    return value


@contextlib.contextmanager
def kernel_backend(backend: str) -> Iterator[None]:
    """Run a block with `HF_LOTION_KERNELS` set to `backend` ("auto", "reference" or "triton").

    Example:
        >>> with kernel_backend("reference"):
        ...     pass  # every hf_lotion op in here uses the plain-PyTorch path
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {', '.join(BACKENDS)}.")
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


# Looked up once at import (plain constants, so torch.compile traces the dispatch without caches).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_CUDA_CAPABLE: dict[int, bool] = {}


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cuda_capable(index: int) -> bool:
    if index not in _CUDA_CAPABLE:
        _CUDA_CAPABLE[index] = torch.cuda.get_device_capability(index) >= MIN_CUDA_CAPABILITY
    return _CUDA_CAPABLE[index]


def triton_can_run(device: torch.device) -> bool:
    """Whether Triton kernels can run on `device` in this process."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return _cuda_capable(device.index if device.index is not None else torch.cuda.current_device())
    return device.type == "cpu" and interpreter_enabled()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether ops on `tensor` (and tensors on its device) go to the Triton kernels."""
    backend = requested_backend()
    if backend == "reference":
        return False
    if backend == "auto":
        return KERNELS_VERIFIED_ON_GPU and tensor.device.type == "cuda" and triton_can_run(tensor.device)
    if not triton_can_run(tensor.device):
        raise ValueError(
            f"{ENV_VAR}=triton, but Triton cannot run on {tensor.device}: it needs triton installed and a "
            "CUDA GPU of compute capability >= 7.0, or CPU tensors with TRITON_INTERPRET=1 set before triton "
            f"is imported. Set {ENV_VAR}=auto to use the PyTorch reference here."
        )
    return True
