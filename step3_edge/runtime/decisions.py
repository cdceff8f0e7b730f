"""What a load decides, decided once: `decide(options, manifest, plan, cfg, host)` turns the
checked `RuntimeOptions`, the bundle and the host into a frozen `LoadDecisions` (backend,
device, compute and KV dtypes, KV tokens per attention rank, engine threads, batch and prefill
chunk, the AFD ranks and their devices). Everything it refuses is refused before any weight is
read. The same object (as `to_dict`, rebuilt with `from_dict`) goes to the AFD ranks."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError
from step3_edge.manifest import Manifest
from step3_edge.plan import Plan
from step3_edge.runtime.backends import default_device, resolve_dtype
from step3_edge.runtime.kv import kv_bytes_per_token
from step3_edge.runtime.options import STEP_SLOTS, OptionError, RuntimeOptions

# backends that run the bundle's subgraphs (ort_backend's graph workers drive both)
GRAPH_BACKENDS = ("onnxruntime", "tensorrt")
# Default prompt tokens per step for the ONNX Runtime / TensorRT graphs: their attention
# materializes [chunk, context] scores, so long prompts in 2048-token chunks took far more time
# and memory (`mini`, float32, ORT, 4,000 tokens: 29.3 s and 8.6 GB over the loaded weights
# in 2048-token chunks, 4.9 s and 2.3 GB in 512-token ones; 1,000 tokens 3.2 -> 2.3 s).
GRAPH_PREFILL_TOKENS = 512
TORCH_PREFILL_TOKENS = 2048
MAX_DEFAULT_KV_TOKENS = 1 << 18   # cap when the plan leaves a whole CPU's memory to KV


@dataclass(frozen=True)
class Host:
    """What a load reads of the machine it runs on."""

    cpu_count: int
    cuda_devices: int
    dist_initialized: bool = False
    world_size: int | None = None      # of the torch.distributed group (AFD 'env')

    @classmethod
    def probe(cls) -> Host:
        import torch.distributed as dist

        up = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if up else (int(os.environ["WORLD_SIZE"])
                                                  if "WORLD_SIZE" in os.environ else None)
        return cls(os.cpu_count() or 1, torch.cuda.device_count()
                   if torch.cuda.is_available() else 0, up, world)


@dataclass(frozen=True)
class AFDDecisions:
    """The AFD ranks of a load: `attention_ranks` (this process first), and with mode
    'spawn' the `ffn_ranks`, each spawned rank's device (attention ranks 1..A-1, then the
    FFN ranks), its intra-op threads and the torch.distributed backend. Under 'env' the
    group's world decides the FFN ranks when it is joined (`afd.start_afd`)."""

    mode: str
    attention_ranks: int
    micro_batches: int
    timeout: float
    ffn_ranks: int | None = None
    devices: tuple[str, ...] = ()
    threads: int | None = None
    dist_backend: str | None = None


@dataclass(frozen=True)
class LoadDecisions:
    """A load's settled choices; `options` holds the options they came from."""

    options: RuntimeOptions
    backend: str
    device: str
    dtype: str
    dtype_reason: str
    kv_dtype: str
    kv_tokens: int                   # per attention rank
    threads: int | None              # the engine thread's intra-op threads (None: as is)
    max_batch: int
    max_prefill_tokens: int
    max_context: int | None          # a TensorRT engine's bound (`within`), else None
    afd: AFDDecisions | None = None

    @property
    def graphs(self) -> bool:
        """Whether the backend runs the bundle's subgraphs (ONNX Runtime, TensorRT)."""
        return self.backend in GRAPH_BACKENDS

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        return getattr(torch, self.kv_dtype)

    def within(self, limits: dict[str, int]) -> LoadDecisions:
        """These decisions inside a backend's engine bounds (TensorRT's optimization
        profiles: `max_batch`, `max_prefill`, `max_context`; none elsewhere)."""
        if not limits:
            return self
        return dataclasses.replace(
            self, max_batch=min(self.max_batch, limits.get("max_batch", self.max_batch)),
            max_prefill_tokens=min(self.max_prefill_tokens,
                                   limits.get("max_prefill", self.max_prefill_tokens)),
            max_context=limits.get("max_context", self.max_context))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (the AFD handshake)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = self.options.to_kwargs()
        out["afd"] = None if self.afd is None else dataclasses.asdict(self.afd)
        if out["afd"] is not None:
            out["afd"]["devices"] = list(self.afd.devices)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadDecisions:
        d = dict(d)
        d["options"] = RuntimeOptions.from_kwargs(**d["options"])
        if d.get("afd") is not None:
            d["afd"] = AFDDecisions(**{**d["afd"], "devices": tuple(d["afd"]["devices"])})
        return cls(**d)


def choose_backend(o: RuntimeOptions, manifest: Manifest) -> str:
    """`backend` as asked, or for "auto" (the default): ONNX Runtime when the bundle has ONNX
    subgraphs, no GPU is used and the compute is float32 (asked, or `resolve_dtype`'s choice:
    the CPU graphs compute in float32, where ORT's fused graphs beat torch ~2x); torch
    otherwise (bf16 compute reads the stored bf16 weights, half the bytes, and is as fast or
    faster: docs/runtime.md)."""
    if o.backend != "auto":
        return o.backend
    dev = o.device or default_device()
    if manifest.subgraphs and dev.startswith("cpu") and \
            resolve_dtype(o.dtype, dev)[0] == torch.float32:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
        return "onnxruntime"
    return "torch"


def _kv(o: RuntimeOptions, dtype: torch.dtype, plan: Plan, cfg: Step3Config, ranks: int
        ) -> tuple[torch.dtype, int]:
    """KV element type and pool size in tokens per attention rank (the plan's KV bytes at
    that type, split over the attention ranks, unless kv_tokens is given)."""
    kv_dtype = getattr(torch, o.kv.dtype) if o.kv.dtype else (
        dtype if dtype == torch.float32 else
        torch.float8_e4m3fn if plan.kv_bytes_per_elem == 1 else torch.bfloat16)
    if o.kv.tokens is not None:
        return kv_dtype, o.kv.tokens
    per_token = kv_bytes_per_token(cfg.text_config, kv_dtype)
    planned = sum(d.kv_bytes for d in plan.device_plans)
    tokens = min(planned // per_token, MAX_DEFAULT_KV_TOKENS)
    if tokens < 16:
        raise ConfigError(f"kv_tokens={tokens}", "give at least 16 KV tokens")
    return kv_dtype, tokens if ranks == 1 else max(16, tokens // ranks)


def _check_resident(o: RuntimeOptions, cfg: Step3Config) -> None:
    t = cfg.text_config
    total = len(t.moe_layers) * t.moe_num_experts
    n = o.experts.resident_experts
    if n is not None and n > total:
        raise OptionError(f"resident_experts={n!r}", f"give a fraction in [0, 1] "
                          f"(resident_fraction) or a count in 0..{total}")


def _afd(o: RuntimeOptions, plan: Plan, device: str, host: Host) -> AFDDecisions:
    a = o.afd
    m = a.attention_ranks
    if m is None:
        m = max(1, sum(d.role == "attention" for d in plan.device_plans))
        if a.mode == "env":
            m = max(1, min(m, (host.world_size or 2) - 1))
    if m * a.micro_batches > STEP_SLOTS:
        raise OptionError(f"{m} attention ranks x {a.micro_batches} micro-batches",
                          f"keep attention_ranks x micro_batches <= {STEP_SLOTS}")
    if a.mode == "env":
        return AFDDecisions("env", m, a.micro_batches, a.timeout, dist_backend=a.backend)
    if host.dist_initialized:
        raise ConfigError("a torch.distributed process group already exists in this process",
                          "load with afd='env' to use it, or close the other AFD runtime")
    n = a.ffn_ranks or max(1, len(plan.ffn_devices) if
                           any(d.role == "ffn" for d in plan.device_plans) else 1)
    a.check_devices(m, n)
    dev = torch.device(device)
    if dev.type == "cuda" and host.cuda_devices >= m + n:
        free = [f"cuda:{i}" for i in range(host.cuda_devices) if i != dev.index]
    else:
        free = [str(dev)] * (m + n - 1)
    devices = tuple([*(a.attention_devices or free[:m - 1]),
                     *(a.ffn_devices or free[m - 1:m - 1 + n])])
    every = [torch.device(d) for d in devices] + [dev]
    distinct = len({(d.type, d.index) for d in every}) == len(every)
    backend = a.backend or ("nccl" if all(d.type == "cuda" for d in every) and distinct
                            else "gloo")
    threads = a.threads or max(1, host.cpu_count // (len(devices) + 1))
    return AFDDecisions("spawn", m, a.micro_batches, a.timeout, n, devices, threads, backend)


def decide(o: RuntimeOptions, manifest: Manifest, plan: Plan, cfg: Step3Config,
           host: Host) -> LoadDecisions:
    """The load's decisions from its options, its bundle and the host (no weight is read)."""
    _check_resident(o, cfg)
    backend = choose_backend(o, manifest)
    device = o.device or default_device()
    if backend in GRAPH_BACKENDS:   # the graphs compute in float32 (another dtype is refused)
        dtype = torch.float32 if o.dtype == "auto" else getattr(torch, o.dtype)
        reason = "the graph backends compute in float32"
    else:
        dtype, reason = resolve_dtype(o.dtype, device)
    afd = None if o.afd.mode is None else _afd(o, plan, device, host)
    kv_dtype, kv_tokens = _kv(o, torch.float32 if backend in GRAPH_BACKENDS else dtype, plan,
                              cfg, 1 if afd is None else afd.attention_ranks)
    threads = o.threads
    if threads is None and afd is not None and afd.mode == "spawn" and \
            torch.device(device).type == "cpu":
        threads = afd.threads                  # share the cores with the spawned workers
    prefill = o.max_prefill_tokens or (GRAPH_PREFILL_TOKENS if backend in GRAPH_BACKENDS
                                       else TORCH_PREFILL_TOKENS)
    return LoadDecisions(
        options=o, backend=backend, device=device,
        dtype=str(dtype).removeprefix("torch."), dtype_reason=reason,
        kv_dtype=str(kv_dtype).removeprefix("torch."), kv_tokens=kv_tokens, threads=threads,
        max_batch=o.max_batch, max_prefill_tokens=prefill, max_context=None, afd=afd)


__all__ = ["AFDDecisions", "GRAPH_BACKENDS", "Host", "LoadDecisions", "choose_backend",
           "decide"]
