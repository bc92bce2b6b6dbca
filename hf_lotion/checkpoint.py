"""Checks on checkpoint files, read from safetensors headers before any weight is loaded."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

from .quant.packing import packed_words
from .quant.spec import resolve_group_size

FORMAT_VERSION = 1
METADATA_FORMAT_KEY = "hf_lotion_format"
METADATA_VERSION_KEY = "hf_lotion_format_version"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking that the file holds every byte it promises."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit in {size} bytes")
            header = json.loads(f.read(header_len))
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"'{path}' is not a readable safetensors file ({err}); it may be corrupted."
        ) from err
    if 8 + header_len + data_end != size:
        raise ValueError(
            f"'{path}' is truncated or corrupted: its header describes {8 + header_len + data_end} bytes, the file "
            f"has {size}. Download or save the checkpoint again."
        )
    return header


def check_checkpoint_files(files: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """The tensor entries of each safetensors file's header, by path, after checking that every file
    (every shard) is complete and was written in a checkpoint format version this code reads.

    Raises `ValueError` naming the file otherwise; nothing but the headers is read.
    """
    headers: dict[str, dict] = {}
    for path in files:
        path = os.fspath(path)
        header = read_safetensors_header(path)
        metadata = header.pop("__metadata__", None) or {}
        version = metadata.get(METADATA_VERSION_KEY)
        if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
            raise ValueError(
                f"'{path}' was written in hf-lotion checkpoint format version {version}; this hf-lotion reads "
                f"versions up to {FORMAT_VERSION}. Upgrade hf-lotion (pip install -U hf-lotion)."
            )
        headers[path] = header
    return headers


def check_packed_checkpoint(
    files: Iterable[str],
    layers: Iterable[tuple[str, int, int]],
    bits: int,
    group_size: int,
) -> None:
    """Raise `ValueError` unless `files` hold, for every `(name, out_features, in_features)` layer, the
    packed tensors that `bits` and `group_size` imply, written by a format version this code reads."""
    tensors: dict[str, tuple[str, dict]] = {}
    for path, header in check_checkpoint_files(files).items():
        for key, info in header.items():
            tensors[key] = (path, info)
    names = list(tensors)

    def find(key: str) -> tuple[str, dict] | None:
        if key in tensors:
            return tensors[key]
        # The checkpoint may carry a different prefix than the model (e.g. "model." for a base model).
        matches = [k for k in names if k.endswith("." + key) or key.endswith("." + k)]
        return tensors[matches[0]] if len(matches) == 1 else None

    where = ", ".join(sorted({os.path.basename(p) for p, _ in tensors.values()})) or "no tensors"
    for name, out_features, in_features in layers:
        n_groups = in_features // resolve_group_size(group_size, in_features)
        expected = {
            "weight": ({"I32"}, [out_features, packed_words(in_features, bits)]),
            "weight_scale": (FLOAT_DTYPES, [out_features, n_groups]),
            "weight_shape": ({"I64", "I32"}, [2]),
        }
        for suffix, (dtypes, shape) in expected.items():
            found = find(f"{name}.{suffix}")
            if found is None:
                raise ValueError(
                    f"Packed checkpoint ({where}) has no tensor '{name}.{suffix}', which the config "
                    f"(bits={bits}, group_size={group_size}) requires for layer '{name}'. The checkpoint is "
                    "incomplete, or its config does not match its tensors."
                )
            path, info = found
            if info["dtype"] not in dtypes or list(info["shape"]) != shape:
                raise ValueError(
                    f"Tensor '{name}.{suffix}' in '{path}' has dtype {info['dtype']} and shape {info['shape']}; "
                    f"the config (bits={bits}, group_size={group_size}, layer {out_features}x{in_features}) "
                    f"needs dtype in {sorted(dtypes)} and shape {shape}. The config does not match the tensors."
                )
