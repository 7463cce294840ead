"""Safetensors files whose bytes depend only on their content.

`deterministic_safetensors` serialises tensors and string metadata with a sorted JSON header, so two
identical runs give byte-identical files (and DVC sees an unchanged output); `read_safetensors_metadata`
reads the metadata of such a file back after checking its format tag. Used by the Fisher
(`alphatoken.fisher`), the reference log-probabilities (`alphatoken.train.reference`) and the token
rewards (`alphatoken.train.token_rewards`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose JSON header has sorted keys. safetensors writes its metadata map in
    hash order, which changes from process to process, so two identical Fisher runs would otherwise
    give files with different content hashes (and DVC would see a changed output). The header's
    tensor offsets are relative to the data section, so re-serialising the header keeps them valid."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to an 8-byte boundary
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def read_safetensors_metadata(path: str | Path, fmt: str, error: type[Exception], what: str, writer: str) -> dict[str, str]:
    """The metadata of a safetensors file written by `writer` with format tag `fmt` (strings); raises
    FileNotFoundError, or `error` naming the file and the field when it is not such a file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # not a safetensors file at all
        raise error(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != fmt:
        raise error(f"{path}: field 'format': expected {fmt!r}, found {metadata.get('format')!r} ({writer})")
    return metadata
