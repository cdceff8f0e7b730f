"""Safetensors shards written in place: the header is computed up front from the entries'
dtypes and shapes, then every chunk's bytes go straight to their offset in the file (pwrite),
so no tensor is ever held whole. The synthetic writer, the quantizer and the bundle exporter
stream through it; the files are plain safetensors, read back by the `safetensors` library.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import Self

import torch

Entry = tuple[str, torch.dtype, tuple[int, ...]]        # stored name, dtype, shape


def plan_shards(specs: list[Any], scheme_of: Callable[[Any], Any], shard_bytes: int
                ) -> list[tuple[str, list[Any], list[Entry]]]:
    """Weights (`WeightSpec`s, in order) grouped into shards of at most `shard_bytes` (a larger
    weight gets one of its own; all parts of a weight stay in one shard), as (file name in
    the Hugging Face form, the weights, every stored part's entry)."""
    groups: list[list[Any]] = [[]]
    size = 0
    for spec in specs:
        nb = scheme_of(spec).nbytes(spec.shape)
        if size and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nb
    out = []
    for i, group in enumerate(groups, 1):
        entries = []
        for spec in group:
            sch = scheme_of(spec)
            dts = sch.part_dtypes()
            entries += [(spec.name + k, dts[k], shp) for k, shp in
                        sch.part_shapes(spec.shape).items()]
        out.append((f"model-{i:05d}-of-{len(groups):05d}.safetensors", group, entries))
    return out


ST_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
            torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8"}


class ShardWriter:
    """One safetensors file of `entries` (name, dtype, shape), filled by `write(name, offset,
    tensor)` calls in any order; `close()` checks that every byte was written."""

    def __init__(self, path: Path, entries: list[Entry]):
        self.path = path
        self.offsets: dict[str, int] = {}
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for name, dtype, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape),
                            "data_offsets": [pos, pos + n]}
            self.offsets[name] = pos
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.size = pos                       # data bytes
        self.written = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, self.base + pos)

    def write(self, name: str, offset: int, t: torch.Tensor) -> None:
        """Write `t`'s bytes at byte `offset` inside entry `name`."""
        buf = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        at = self.base + self.offsets[name] + offset
        done = 0
        while done < buf.nbytes:
            done += os.pwrite(self.fd, memoryview(buf)[done:], at + done)
        self.written += buf.nbytes

    def close(self) -> None:
        os.close(self.fd)
        if self.written != self.size:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.size} data bytes")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self.fd)
