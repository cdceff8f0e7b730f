"""Streaming requantization of a checkpoint folder for a target.

Memory is bounded by one chunk, not by a tensor or the model: every 2-D/3-D weight is
processed per expert (several small experts at once) and per block of rows (a multiple of
128 rows, about `CHUNK_ELEMS` values), and the output safetensors shards are written in
place: each shard's header is computed up front from the recipe (`Scheme.part_shapes` /
`part_dtypes`), then every chunk's bytes go straight to their offset in the file.

Output is written to `.OUT.partial` and renamed to OUT only when complete (`staged_dir`): an
interrupted run never leaves a folder named OUT, and the next run removes the leftover and
starts clean (no resume: a conversion is minutes to hours, resuming is not worth the risk of
stitching shards from two runs).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from step3_edge.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    check_values,
    safe_name,
)
from step3_edge.errors import QuantizationError
from step3_edge.fsutil import staged_dir
from step3_edge.layout import WeightSpec
from step3_edge.quantize.recipe import Recipe, build_recipe
from step3_edge.quantize.report import ErrorAccumulator, QuantReport, TensorError
from step3_edge.quantize.schemes import BF16, Scheme, get_scheme
from step3_edge.shard_writer import ShardWriter, plan_shards
from step3_edge.targets import Target, get_target

CHUNK_ELEMS = 1 << 20          # ~1M values (4 MB in float32) per unit of work; 8M-value
                               # chunks measured ~2x slower (fresh 32+ MB buffers are mmapped
                               # by malloc and page-faulted in on every chunk)
DEFAULT_SHARD_BYTES = 4 << 30  # 4 GiB shards
ROW_ALIGN = 128                # row chunks start on a block boundary of every scheme


@dataclass(frozen=True)
class ConvertResult:
    """What `convert_checkpoint` wrote: folder, per-weight schemes, error report, sizes."""

    out: Path
    modules: dict[str, str]      # weight name -> scheme name (what quantization_config holds)
    report: QuantReport
    source_bytes: int
    output_bytes: int
    seconds: float


# ---------------------------------------------------------------------------- planning
def _part_bytes(scheme: Scheme, shape: tuple[int, ...]) -> dict[str, int]:
    dts = scheme.part_dtypes()
    return {k: math.prod(s) * torch.empty((), dtype=dts[k]).element_size()
            for k, s in scheme.part_shapes(shape).items()}


def _part_rows(scheme: Scheme, rows: int, cols: int) -> dict[str, int]:
    """Stored rows of each part for the first `rows` rows of an [out, in] matrix."""
    return {k: (s[-2] if len(s) >= 2 else 0)
            for k, s in scheme.part_shapes((rows, cols)).items()}


def _row_chunks(out_dim: int, in_dim: int) -> Iterator[tuple[int, int]]:
    step = max(ROW_ALIGN, (CHUNK_ELEMS // max(in_dim, 1)) // ROW_ALIGN * ROW_ALIGN)
    for r0 in range(0, out_dim, step):
        yield r0, min(out_dim, r0 + step)


# ---------------------------------------------------------------------------- conversion
class _Converter:
    def __init__(self, reader: CheckpointReader, report: QuantReport, bar: tqdm) -> None:
        self.reader, self.report, self.bar = reader, report, bar

    def _src_rows(self, name: str, src: Scheme, experts: tuple[int, int] | None, r0: int,
                  r1: int, cols: int) -> dict[str, torch.Tensor]:
        """Source parts of rows [r0, r1) (of experts [e0, e1)) without reading the rest."""
        before, upto = _part_rows(src, r0, cols), _part_rows(src, r1, cols)
        parts = {}
        for k in ("",) + src.suffixes:
            sl = self.reader.get_slice(name + k)  # lazy safetensors slice (mmap)
            if experts is None:
                parts[k] = sl[before[k]:upto[k]]                      # [rows, ...]
            else:
                parts[k] = sl[experts[0]:experts[1], before[k]:upto[k]]  # [n_e, rows, ...]
            if k:
                check_values(name + k, parts[k], scale=True)          # small: one per block
        return parts

    def weight(self, spec: WeightSpec, dst: Scheme, shard: ShardWriter) -> None:
        t0 = time.perf_counter()
        name, shape = spec.name, spec.shape
        src = self.reader.scheme_of(name)
        src_dtypes = {k: self.reader.stored_dtype(name + k) for k in ("",) + src.suffixes}
        acc = ErrorAccumulator()
        copied = src == dst and src_dtypes == dst.part_dtypes()
        if copied:
            self._copy(name, src, shard)
        elif len(shape) in (2, 3):
            self._requantize(spec, src, dst, shard, acc)
        else:
            if not isinstance(dst, BF16):
                raise QuantizationError(f"{name} {list(shape)} cannot be stored as {dst.name}",
                                        "keep it bf16 (only [..., out, in] weights quantize)")
            w = self.reader.read(name)                               # small: norms, biases
            parts = dst.quantize(w)
            acc.add(w, dst.dequantize(parts, shape))
            shard.write(name, 0, parts[""])
            self.bar.update(sum(_part_bytes(src, shape).values()))
        self.report.tensors.append(TensorError(
            name, dst.name, src.name, shape, sum(_part_bytes(src, shape).values()),
            sum(_part_bytes(dst, shape).values()), acc.rel_fro, acc.max_abs, copied,
            acc.sq_err, acc.sq_ref, time.perf_counter() - t0))

    def _copy(self, name: str, scheme: Scheme, shard: ShardWriter) -> None:
        """Same scheme and dtypes as the source: copy stored bytes, chunk by leading rows."""
        for k in ("",) + scheme.suffixes:
            stored = name + k
            shape = self.reader.stored_shape(stored)
            sl = self.reader.get_slice(stored)
            row = math.prod(shape[1:]) if len(shape) > 1 else 1
            step = max(1, CHUNK_ELEMS // max(row, 1))
            offset = 0
            for a in range(0, shape[0] if shape else 1, step):
                t = sl[a:a + step] if shape else sl[:]
                check_values(stored, t, scale=bool(k))
                shard.write(stored, offset, t)
                nb = t.numel() * t.element_size()
                offset += nb
                self.bar.update(nb)

    def _requantize(self, spec: WeightSpec, src: Scheme, dst: Scheme, shard: ShardWriter,
                    acc: ErrorAccumulator) -> None:
        """Expert by expert and row block by row block; small experts go several at a time
        (whole matrices, so their bytes stay contiguous in every part)."""
        name, shape = spec.name, spec.shape
        out_dim, in_dim = shape[-2], shape[-1]
        rows = list(_row_chunks(out_dim, in_dim))
        if len(shape) == 2:
            groups: list[tuple[int, int] | None] = [None]
        else:
            step = max(1, CHUNK_ELEMS // (out_dim * in_dim)) if len(rows) == 1 else 1
            groups = [(e, min(shape[0], e + step)) for e in range(0, shape[0], step)]
        per_matrix = _part_bytes(dst, (out_dim, in_dim))             # bytes of one expert
        src_matrix = sum(_part_bytes(src, (out_dim, in_dim)).values())
        for g in groups:
            lead = () if g is None else (g[1] - g[0],)
            for r0, r1 in rows:
                parts = self._src_rows(name, src, g, r0, r1, in_dim)
                w = src.dequantize(parts, (*lead, r1 - r0, in_dim))   # [(n_e,) rows, in] f32
                del parts
                check_values(name, w)                                 # the chunk in memory
                q = dst.quantize(w)
                acc.add(w, dst.dequantize(q, (*lead, r1 - r0, in_dim)))
                before = _part_bytes(dst, (r0, in_dim))
                for k, t in q.items():
                    shard.write(name + k, (g[0] if g else 0) * per_matrix[k] + before[k], t)
                del w, q
            self.bar.update(src_matrix * (lead[0] if lead else 1))


def convert_checkpoint(model: str | Path, out: str | Path, target: str | Target,
                       recipe: Recipe | None = None, *, overwrite: bool = False,
                       shard_bytes: int = DEFAULT_SHARD_BYTES,
                       progress: bool = True) -> ConvertResult:
    """Requantize checkpoint folder `model` for `target` into a new checkpoint folder `out`
    (sharded safetensors + index + config.json with a `step3_edge` quantization_config, plus
    the source's tokenizer / generation files). `recipe` defaults to the target's."""
    t0 = time.perf_counter()
    model, out = Path(model), Path(out)
    tgt = get_target(target) if isinstance(target, str) else target
    if out.resolve() == model.resolve():
        raise QuantizationError(f"--out {out} is the source checkpoint itself",
                                "write the quantized checkpoint to a new folder")
    recipe = recipe or build_recipe(tgt)
    reader = CheckpointReader(model)
    reader.check()
    side = side_files(model)                      # checked before any weight is read
    specs = list(reader.expected.values())
    modules = recipe.resolve(specs)
    schemes = {n: get_scheme(s) for n, s in modules.items()}

    shards = plan_shards(specs, lambda spec: schemes[spec.name], shard_bytes)

    src_total = sum(math.prod(reader.stored_shape(s)) * reader.stored_dtype(s).itemsize
                    for s in reader.stored_names())
    report = QuantReport(tgt.name)
    weight_map: dict[str, str] = {}
    total = 0
    with staged_dir(out, overwrite, quantized_checkpoint_owned, [model]) as tmp, \
            tqdm(total=src_total, unit="B", unit_scale=True, desc=f"quantize {tgt.name}",
                 disable=not progress) as bar:
        conv = _Converter(reader, report, bar)
        for fname, group, entries in shards:
            weight_map.update({name: fname for name, _, _ in entries})
            with ShardWriter(tmp / fname, entries) as shard:
                for spec in group:
                    conv.weight(spec, schemes[spec.name], shard)
            total += shard.size
        reader.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        src_qc = reader.cfg.quantization_config or {}
        qc = {"quant_method": "step3_edge", "modules": modules, "target": tgt.name,
              "source_quant_method": src_qc.get("quant_method", "bf16"),
              "recipe": recipe.to_json(), "format_version": 1}
        reader.cfg.with_quantization(qc).save(tmp)
        for name, path in side:
            shutil.copyfile(path, tmp / name)
    report.seconds = time.perf_counter() - t0
    return ConvertResult(out, modules, report, src_total, total, report.seconds)


def side_files(src: Path) -> list[tuple[str, Path]]:
    """(name, resolved path) of the tokenizer, generation config, chat template...: every
    top-level file that is not a weight file, the index or config.json. Each must resolve
    inside the checkpoint (or its hub repo cache); the tokenizer files must load."""
    from step3_edge.tokenizer import check_tokenizer_files

    out = []
    for f in sorted(src.iterdir()):
        if (not f.name.startswith(".") and f.suffix != ".safetensors"
                and f.name not in (INDEX_NAME, SINGLE_NAME, "config.json")
                and (f.is_file() or f.is_symlink())):
            out.append((f.name, safe_name(src, f.name)))
    check_tokenizer_files(src)
    return out


def quantized_checkpoint_owned(folder: Path) -> str | None:
    """None when `folder` is a checkpoint `step3-edge quantize` wrote (its config.json says
    quant_method step3_edge, and it holds files only); else why it is not."""
    from step3_edge.config import Step3Config
    from step3_edge.errors import Step3EdgeError

    try:
        qc = Step3Config.from_pretrained(folder).quantization_config or {}
    except Step3EdgeError:
        return "it holds no readable config.json of a quantized checkpoint"
    if qc.get("quant_method") != "step3_edge":
        return "its config.json is not one step3-edge quantize wrote (no step3_edge " \
               "quantization_config)"
    sub = [p.name for p in folder.iterdir() if p.is_dir() or p.is_symlink()]
    if sub:
        return f"it holds folders or links this tool does not write: {sorted(sub)[:5]}"
    return None
