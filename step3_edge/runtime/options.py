"""The runtime's load options as one frozen, typed object: `RuntimeOptions`, with groups for
the routed experts (`ExpertOptions`), the KV cache (`KVOptions`) and attention / FFN
disaggregation (`AFDOptions`).

`RuntimeOptions.from_kwargs(**kw)` takes `Step3Runtime.load`'s keywords (their names are the
fields' `key`s) and checks every value, and every pair that contradicts, before any file is
opened; a bad one is an `OptionError` naming it. Each field's metadata holds its load keyword,
its help and its value kind, from which the command line's runtime flags are generated
(`step3_edge.cli.RUNTIME_OPTIONS`), so the flags and the API cannot drift.

What the options leave open (backend "auto", the KV pool, threads, prefill chunk, AFD ranks)
is decided once, from the options, the bundle and the host, by `decisions.decide`.

This module imports no torch at import time (the CLI builds its parser from it)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from step3_edge.errors import ConfigError

MAX_MICRO_BATCHES = 14      # per attention rank (afd_protocol's step header)
STEP_SLOTS = 62             # attention ranks x micro-batches in one step header
DTYPES = ("auto", "bfloat16", "float32", "float16")
KV_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
CACHE_POLICIES = ("static", "lru", "lfu")
MISS_POLICIES = ("cpu", "copy", "auto")
AFD_MODES = ("spawn", "env")
MIN_KV_TOKENS = 16
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))   # past it a thread team cannot start


class OptionError(ConfigError):
    """A runtime load option that is unknown, of the wrong type or out of range, or two
    options that contradict each other."""


def opt(key: str, help: str, default: Any = None, *, kind: str, choices: tuple = (),
        metavar: str | None = None, flag: bool = True) -> Any:
    """A field of the option groups: its `Step3Runtime.load` keyword, help and value kind
    (count, count0, fraction, seconds, kv_tokens, bool, tristate, choice, device, devices,
    counts, bandwidths, afd); `flag=False` keeps it off the command line."""
    return field(default=default, metadata={"key": key, "help": help, "kind": kind,
                                            "choices": choices, "metavar": metavar,
                                            "flag": flag})


# ---------------------------------------------------------------------------- checking
def _bad(key: str, value: Any, remedy: str) -> OptionError:
    return OptionError(f"{key}={value!r}", remedy)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(f: dataclasses.Field, value: Any) -> Any:
    """`value` of field `f` checked and normalized (names for dtypes and devices, tuples for
    lists), or an OptionError naming it."""
    m = f.metadata
    key, kind, choices = m["key"], m["kind"], m["choices"]
    if value is None and kind != "bool":
        return f.default                            # unset: the default
    if kind in ("count", "count0", "kv_tokens"):
        low = {"count": 1, "count0": 0, "kv_tokens": MIN_KV_TOKENS}[kind]
        if not _is_int(value) or value < low:
            raise _bad(key, value, f"give {key} as a whole number >= {low}")
        if key.endswith("threads") and value > MAX_THREADS:
            raise _bad(key, value, f"give {key} as at most {MAX_THREADS} (this machine has "
                       f"{os.cpu_count()} cores)")
    elif kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value <= 1:
            raise _bad(key, value, f"give {key} as a number in [0, 1]")
        value = float(value)
    elif kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise _bad(key, value, f"give {key} (seconds to wait) as a number > 0")
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise _bad(key, value, f"give {key} as True or False")
    elif kind == "tristate":
        if not isinstance(value, bool):
            raise _bad(key, value, f"give {key} as None, True or False")
    elif kind == "choice":
        if not isinstance(value, str):           # a torch.dtype, say: its name
            value = str(value).removeprefix("torch.")
        if value not in choices:
            raise _bad(key, value, "use one of: " + ", ".join(repr(c) for c in choices))
    elif kind == "afd":
        value = _afd_mode(value)
    elif kind == "device":
        value = _device(key, value)
    elif kind == "devices":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _bad(key, value, f"give {key} as a list of devices, e.g. ['cuda:1']")
        value = tuple(_device(key, d) for d in value)
    elif kind == "counts":
        if not isinstance(value, (str, os.PathLike, dict)):
            raise _bad(key, value, "give a profile JSON path (from `step3-edge profile`) or "
                       "a {layer: [count per expert]} dict")
        value = str(value) if isinstance(value, os.PathLike) else value
    elif kind == "bandwidths":
        value = _bandwidths(value)
    return value


def _device(key: str, value: Any) -> str:
    """A torch device name, parsed by torch (without touching the device)."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise _bad(key, value, f"give 'cpu', 'cuda' or 'cuda:N' ({e})") from e
    if dev.type not in ("cpu", "cuda"):            # meta, mps, xpu...: no backend runs there
        raise _bad(key, value, "give 'cpu', 'cuda' or 'cuda:N'")
    return str(dev)


def _bandwidths(bw: Any) -> Any:
    """A `Bandwidths`, or a dict of its fields (what AFD ranks receive) made into one."""
    from step3_edge.runtime.cost_model import Bandwidths

    if isinstance(bw, Bandwidths):
        return bw
    fields = dataclasses.fields(Bandwidths)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    if isinstance(bw, dict) and set(required) <= set(bw) <= {f.name for f in fields}:
        return Bandwidths(**bw)
    raise OptionError(f"bandwidths={bw!r}",
                      f"give a Bandwidths or a dict with {', '.join(required)} (bytes/s and "
                      "FLOP/s; optional: measured, cpu_overhead, copy_overhead), or leave it "
                      "out to measure at start-up")


class _Checked:
    """Checks and normalizes every field in `__post_init__` (frozen: set through object)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):         # type: ignore[arg-type]
            if "key" in f.metadata:
                object.__setattr__(self, f.name, _check(f, getattr(self, f.name)))


# ---------------------------------------------------------------------------- the groups
@dataclass(frozen=True)
class ExpertOptions(_Checked):
    """Where the routed experts live and how misses are served. At most one of
    `resident_experts` (a count) and `resident_fraction` (of all routed experts) is set;
    neither: the plan's hot set (on one CUDA card, as many of it as fit)."""

    resident_experts: int | None = opt(
        "resident_experts", "routed experts kept on the device, a count over all MoE layers "
        "(default: the plan's hot set)", kind="count0", metavar="N")
    resident_fraction: float | None = opt(
        "resident_fraction", "routed experts kept on the device, a fraction in [0, 1] of all "
        "of them (1.0: all; default: the plan's hot set)", kind="fraction", metavar="F")
    cache: str = opt("cache", "device expert cache policy: 'static', 'lru' or 'lfu' "
                     "(default: lfu)", "lfu", kind="choice", choices=CACHE_POLICIES)
    miss: str = opt("miss", "on an expert-cache miss: 'cpu' (compute the expert there), "
                    "'copy' (into the cache) or 'auto' (the cost model decides; default)",
                    "auto", kind="choice", choices=MISS_POLICIES)
    prefetch: bool | None = opt("prefetch", "copy the next layer's predicted experts ahead "
                                "(default: on CUDA with a dynamic cache)", kind="tristate")
    expert_counts: str | dict | None = opt(
        "expert_counts", "profile JSON path (from `step3-edge profile`) or {layer: [count "
        "per expert]} that picks the resident experts (default: the plan's)",
        kind="counts", metavar="JSON")
    stacked_experts: bool | None = opt(
        "stacked_experts", "on a CPU with every routed expert resident and bf16 weights, also "
        "keep each layer's experts stacked (a second copy) and run decode-sized batches "
        "through two GEMMs instead of two per expert (default: unless the native GEMV runs "
        "the experts, which is faster per expert)", kind="tristate")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resident_experts is not None and self.resident_fraction is not None:
            raise OptionError(f"resident_experts={self.resident_experts} and "
                              f"resident_fraction={self.resident_fraction}", "give one of them")


@dataclass(frozen=True)
class KVOptions(_Checked):
    """The paged KV pool and the prefix cache."""

    tokens: int | None = opt("kv_tokens", "KV pool size in tokens, per attention rank under "
                             "AFD, at least 16 (default: the plan's KV bytes at kv_dtype, "
                             "split evenly over the attention ranks)", kind="kv_tokens",
                             metavar="N")
    dtype: str | None = opt("kv_dtype", "KV element type (default: float32 under float32 "
                            "compute, else the plan's: fp8 -> float8_e4m3fn, 2 bytes -> "
                            "bfloat16)", kind="choice", choices=KV_DTYPES)
    prefix_cache: bool = opt("prefix_cache", "reuse the KV blocks of finished sequences for "
                             "prompts that start with the same tokens and images (default: "
                             "on)", True, kind="bool")


@dataclass(frozen=True)
class AFDOptions(_Checked):
    """Attention / FFN disaggregation across processes (`mode` None: one process)."""

    mode: str | None = opt("afd", "attention / FFN disaggregation across processes: off "
                           "(default, one process), 'spawn' (load keyword afd=True: start the "
                           "worker processes here) or 'env' (this process is rank 0 of a "
                           "torchrun / env:// group whose other ranks run `python -m "
                           "step3_edge.runtime.afd`)", kind="afd", choices=AFD_MODES)
    ffn_ranks: int | None = opt("ffn_ranks", "FFN worker processes to spawn with afd "
                                "(default: the plan's FFN devices, at least 1); experts are "
                                "split across them", kind="count", metavar="N")
    attention_ranks: int | None = opt(
        "attention_ranks", "AFD attention ranks, data-parallel: each holds the attention "
        "weights and the KV cache of its own sequences; this process is the first, spawn "
        "starts the others (default: the plan's attention devices, at least 1); requests go "
        "to the least-loaded one", kind="count", metavar="N")
    attention_devices: tuple[str, ...] | None = opt(
        "attention_devices", "devices of the spawned attention ranks after this one, e.g. "
        "cuda:1 (default: like ffn_devices)", kind="devices", metavar="DEVICE")
    ffn_devices: tuple[str, ...] | None = opt(
        "ffn_devices", "devices of the spawned FFN workers, e.g. cuda:1 (default: one GPU "
        "each after the attention's when there are enough, else the CPU)", kind="devices",
        metavar="DEVICE")
    micro_batches: int = opt("micro_batches", "AFD micro-batches per step and attention rank, "
                             f"1..{MAX_MICRO_BATCHES} (default: 3, as the Step3 paper)", 3,
                             kind="count", metavar="N")
    threads: int | None = opt("afd_threads", "intra-op threads of each spawned worker, and of "
                              "this process's engine thread on a CPU unless threads is given "
                              "(default: cores / processes)", kind="count", metavar="N")
    timeout: float = opt("afd_timeout", "seconds to wait for an AFD worker before failing "
                         "(default: 300)", 300.0, kind="seconds", metavar="S")
    backend: str | None = opt("afd_backend", "torch.distributed backend: 'gloo' or 'nccl' "
                              "(default: nccl when every rank has its own GPU, else gloo)",
                              kind="choice", choices=("gloo", "nccl"))

    def __post_init__(self) -> None:
        super().__post_init__()
        m, a, n = self.micro_batches, self.attention_ranks, self.ffn_ranks
        if self.mode is None:
            if a not in (None, 1):
                raise OptionError(f"attention_ranks={a!r} without afd",
                                  "load with afd=True (or 'env') for several attention ranks")
            return
        if m > MAX_MICRO_BATCHES:
            raise _bad("micro_batches", m, f"use 1..{MAX_MICRO_BATCHES}")
        if a is not None and a * m > STEP_SLOTS:
            raise OptionError(f"{a} attention ranks x {m} micro-batches",
                              f"keep attention_ranks x micro_batches <= {STEP_SLOTS}")
        if self.mode == "spawn":
            self.check_devices(a, n)

    def check_devices(self, attention_ranks: int | None, ffn_ranks: int | None) -> None:
        """One device per spawned attention rank after rank 0 and per FFN rank, where given."""
        for name, lst, want, who in (
                ("attention_devices", self.attention_devices,
                 None if attention_ranks is None else attention_ranks - 1,
                 "attention rank after rank 0"),
                ("ffn_devices", self.ffn_devices, ffn_ranks, "FFN rank")):
            if lst is not None and want is not None and len(lst) != want:
                raise OptionError(f"{name}={list(lst)!r} for {want} rank(s)",
                                  f"give one device per {who}")


def _afd_mode(value: Any) -> str | None:
    """The `afd` keyword: False / None (off), True or 'spawn', 'env'."""
    if value is None or value is False:
        return None
    if value is True or value == "spawn":
        return "spawn"
    if value == "env":
        return "env"
    raise _bad("afd", value, "use False, True (spawn worker processes) or 'env' (this process "
               "is rank 0 of a torchrun / env:// group)")


# ---------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class RuntimeOptions(_Checked):
    """Every option of `Step3Runtime.load`, checked; `from_kwargs` builds it from the load
    keywords, `to_kwargs` gives them back (JSON-able: what the AFD ranks receive)."""

    device: str | None = opt("device", "torch device: cpu, cuda, cuda:1 (default: CUDA when "
                             "present, else cpu)", kind="device", metavar="DEVICE")
    dtype: str = opt("dtype", "compute dtype: 'auto' (default: bfloat16 on a GPU and on a CPU "
                     "where bf16 decode is fast (the native kernels, or oneDNN's bf16 math), "
                     "else float32; stats say which and why), 'bfloat16', 'float32' (the "
                     "reference's numerics) or 'float16'", "auto", kind="choice",
                     choices=DTYPES)
    backend: str = opt("backend", "'torch', 'onnxruntime' (the bundle's ONNX subgraphs; CPU "
                       "provider, or CUDA with onnxruntime-gpu), 'tensorrt' (the bundle's "
                       "TensorRT engines on a CUDA GPU) or 'auto' (default: onnxruntime for "
                       "float32 compute on a CPU when the bundle has ONNX subgraphs, else "
                       "torch)", "auto", kind="choice", choices=BACKENDS)
    threads: int | None = opt("threads", "intra-op threads of the engine thread, which runs "
                              "every step (with afd: the attention side here; default: "
                              "torch.get_num_threads() at load, or afd_threads with a spawned "
                              "AFD on a CPU; app: one fewer, leaving a core to the browser); "
                              "like torch.set_num_threads, it also becomes the count of "
                              "threads that first use torch later", kind="count", metavar="N")
    max_batch: int = opt("max_batch", "sequences decoded together (default: 32)", 32,
                         kind="count", metavar="N")
    max_prefill_tokens: int | None = opt(
        "max_prefill_tokens", "prompt tokens per step (default: 2048 with torch, 512 with "
        "the graph backends; longer prompts are chunked)", kind="count", metavar="N")
    native_kernels: bool | None = opt(
        "native_kernels", "on an x86-64 CPU (AVX512-BF16, or AVX2 + FMA) under bf16 compute, "
        "run decode-sized bf16 linears, RMSNorms, SwiGLU MLPs, experts, attention and fp8 KV "
        "reads through the native kernels built on first use with the C compiler (default: "
        "where they build; off: torch / oneDNN only, the reference's exact bits; on: "
        "required)", kind="tristate")
    ort_threads: int | None = opt("ort_threads", "ONNX Runtime intra-op threads (default: "
                                  "ORT's, one per core)", kind="count", metavar="N")
    bandwidths: Any = opt("bandwidths", "a Bandwidths, or a dict of its fields, to skip the "
                          "start-up measurement", kind="bandwidths", flag=False)
    verify: bool = opt("verify", "check every artifact's sha256 before loading (default: "
                       "off)", False, kind="bool")
    vision: bool = opt("vision", "load the vision tower (default: on)", True, kind="bool")
    sync_timing: bool = opt("sync_timing", "synchronize CUDA around each layer side for exact "
                            "timings (default: off)", False, kind="bool")
    experts: ExpertOptions = field(default_factory=ExpertOptions)
    kv: KVOptions = field(default_factory=KVOptions)
    afd: AFDOptions = field(default_factory=AFDOptions)

    @classmethod
    def from_kwargs(cls, **kw: Any) -> RuntimeOptions:
        """The options of `Step3Runtime.load(bundle, **kw)`. `resident` is kept as a shorthand:
        an int is `resident_experts`, a float `resident_fraction` (1 is one expert, 1.0 all
        of them); `afd=True` is `afd='spawn'`."""
        unknown = sorted(set(kw) - set(LOAD_KEYWORDS))
        if unknown:
            raise OptionError(f"unknown runtime option(s) {unknown}",
                              "known options: " + ", ".join(LOAD_KEYWORDS))
        kw = dict(kw)
        if "resident" in kw:
            r = kw.pop("resident")
            if r is not None:
                if isinstance(r, bool) or not isinstance(r, (int, float)):
                    raise _bad("resident", r, "give a fraction in [0, 1] (a float) or a count "
                               "of experts (a whole number)")
                name = "resident_fraction" if isinstance(r, float) else "resident_experts"
                if kw.get(name) is not None:
                    raise OptionError(f"resident={r!r} and {name}={kw[name]!r}", "give one")
                kw[name] = r
        if "afd" in kw:
            kw["afd"] = _afd_mode(kw["afd"])
        groups: dict[str, dict[str, Any]] = {"": {}, "experts": {}, "kv": {}, "afd": {}}
        for key, value in kw.items():
            group, name = _PATHS[key]
            groups[group][name] = value
        return cls(experts=ExpertOptions(**groups["experts"]), kv=KVOptions(**groups["kv"]),
                   afd=AFDOptions(**groups["afd"]), **groups[""])

    def to_kwargs(self) -> dict[str, Any]:
        """The load keywords that differ from their defaults, as JSON-able values."""
        out: dict[str, Any] = {}
        for f, value, group in _walk(self):
            if value == f.default:
                continue
            if f.metadata["kind"] == "bandwidths":
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = {str(k): list(v) for k, v in value.get("expert_counts", value).items()}
            out[f.metadata["key"]] = value
        return out


def _walk(o: RuntimeOptions) -> Iterator[tuple[dataclasses.Field, Any, str]]:
    """(field, value, group name) of every option, groups flattened."""
    for f in dataclasses.fields(o):
        v = getattr(o, f.name)
        if "key" in f.metadata:
            yield f, v, ""
        else:
            for g in dataclasses.fields(v):
                yield g, getattr(v, g.name), f.name


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """(group, field) of every option in declaration order ('' for the top level)."""
    out = []
    for f in dataclasses.fields(RuntimeOptions):
        if "key" in f.metadata:
            out.append(("", f))
        else:
            out.extend((f.name, g) for g in dataclasses.fields(f.default_factory))  # type: ignore[misc]
    return out


_PATHS: dict[str, tuple[str, str]] = {f.metadata["key"]: (g, f.name) for g, f in option_fields()}
RESIDENT_HELP = ("routed experts kept on the device: a fraction in [0, 1] (a float, written "
                 "with a decimal point on the command line: 0.5, 1.0 = all) or a count (an "
                 "int: 12) (default: the plan's hot set); shorthand of resident_fraction / "
                 "resident_experts")
# every `Step3Runtime.load` keyword -> its help (the fields', plus the `resident` shorthand)
LOAD_KEYWORDS: dict[str, str] = {
    **{f.metadata["key"]: f.metadata["help"] for _, f in option_fields()},
    "resident": RESIDENT_HELP}


__all__ = ["AFDOptions", "ExpertOptions", "KVOptions", "LOAD_KEYWORDS", "OptionError",
           "RuntimeOptions", "option_fields"]
