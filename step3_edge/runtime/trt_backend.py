"""The TensorRT backend: the bundle's TensorRT engines (export/trt.py) run the subgraphs,
behind the same `run(kind, feeds, layer, expert)` interface as the ONNX Runtime backend, so
the graph workers of ort_backend.py (and with them the scheduler, the paged KV pool and the
AFD pipeline) drive it unchanged.

The export writes one refittable, weight-stripped plan per subgraph (`device-<d>/trt/*.plan`,
two optimisation profiles: prefill and decode). Here each layer / expert instance is that plan
deserialized and refitted with the instance's weights (`export.trt.refit_engine`, fed the same
`binding.bind` arrays ONNX Runtime gets), with one execution context per profile; a call takes
the decode profile when its shapes fit it, else the prefill one. All engines of a device share
one stream and one activation buffer (`Scratch`; calls run one at a time). Inputs are copied
to the GPU in the engine's I/O types, outputs come back as float32 / int64 host arrays (the graph
boundary of the ONNX backend: the paged KV pool stays in host memory).

Written against TensorRT 10's Python API (`execute_async_v3`, named I/O tensors); tested here
without TensorRT only up to its refusals and the profile choice (docs/runtime.md, "Backends").
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from step3_edge.errors import BundleError, ConfigError, MissingExtraError, PromptError
from step3_edge.export.binding import Bound
from step3_edge.export.onnx_runner import BundleGraphs
from step3_edge.manifest import Manifest
from step3_edge.runtime.kernels import NO_KERNELS
from step3_edge.runtime.ort_backend import check_graph_bundle

# TensorRT I/O types (trt.DataType member names) -> torch dtypes
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8,
                "UINT8": torch.uint8, "BOOL": torch.bool}
DECODE, PREFILL = 1, 0          # profile indices, in the order export/trt.py adds them

Bounds = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def pick_profile(shapes: dict[str, tuple[int, ...]], bounds: list[Bounds],
                 prefer: tuple[int, ...] = (DECODE, PREFILL)) -> int | None:
    """The first profile in `prefer` whose (min, max) bounds hold every input shape, or
    None."""
    for p in prefer:
        if p < len(bounds) and all(
                len(s) == len(bounds[p][n][0]) and all(lo <= d <= hi for d, lo, hi in
                                                       zip(s, *bounds[p][n]))
                for n, s in shapes.items()):
            return p
    return None


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise MissingExtraError("tensorrt", "trt", "backend='tensorrt'") from None
    return tensorrt


class Scratch:
    """One stream and one activation buffer for every engine on a device. Calls run one at a
    time (each waits for its outputs), so the engines' contexts can share the memory instead of
    holding their own: thousands of expert engines, each with a prefill profile, would not fit
    otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.buf = torch.empty(0, dtype=torch.uint8, device=device)

    def lend(self, ctx: Any, nbytes: int) -> None:
        """Point `ctx` at the shared buffer, grown to `nbytes` first if needed."""
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if hasattr(ctx, "set_device_memory"):                  # TensorRT >= 10.1
            ctx.set_device_memory(self.buf.data_ptr(), self.buf.numel())
        else:
            ctx.device_memory = self.buf.data_ptr()


class TrtEngine:
    """One refitted engine (one subgraph instance) and an execution context per profile, on
    the device's shared `Scratch`."""

    def __init__(self, trt: Any, engine: Any, scratch: Scratch, name: str) -> None:
        self.engine, self.scratch, self.name = engine, scratch, name
        self.device = scratch.device
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in io if n not in self.inputs]
        self.dtypes = {n: TORCH_DTYPES[engine.get_tensor_dtype(n).name] for n in io}
        self.memory = getattr(engine, "device_memory_size_v2", None) or \
            engine.device_memory_size                           # bytes one call needs
        self.bounds: list[Bounds] = []
        self.contexts = []
        for p in range(engine.num_optimization_profiles):
            lo_opt_hi = {n: engine.get_tensor_profile_shape(n, p) for n in self.inputs}
            self.bounds.append({n: (tuple(v[0]), tuple(v[2])) for n, v in lo_opt_hi.items()})
            ctx = _user_managed_context(trt, engine)
            ctx.set_optimization_profile_async(p, scratch.stream.cuda_stream)
            self.contexts.append(ctx)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        p = pick_profile(shapes, self.bounds)
        if p is None:
            raise PromptError(f"input shapes {shapes} are outside the TensorRT engine "
                              f"{self.name}'s profiles {self.bounds}",
                              "lower max_prefill_tokens / the context, re-export with larger "
                              "engine shapes, or load with backend='onnxruntime'")
        ctx, keep, stream = self.contexts[p], [], self.scratch.stream
        self.scratch.lend(ctx, self.memory)
        with torch.cuda.stream(stream):
            for n in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(
                    self.device, self.dtypes[n])
                keep.append(t)
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, _address(t, keep))
            outs = {}
            for n in self.outputs:
                t = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.dtypes[n],
                                device=self.device)
                outs[n] = t
                ctx.set_tensor_address(n, _address(t, keep))
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT could not run engine {self.name}")
            host = {n: (t.float() if t.is_floating_point() else t.long()).to("cpu")
                    for n, t in outs.items()}
        stream.synchronize()
        return {n: t.numpy() for n, t in host.items()}


def _user_managed_context(trt: Any, engine: Any) -> Any:
    """An execution context without its own activation memory (`Scratch.lend` gives it):
    TensorRT 10 takes the strategy, later versions a runtime config."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if hasattr(engine, "create_runtime_config"):
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(config)
    return engine.create_execution_context(strategy)


def _address(t: torch.Tensor, keep: list[torch.Tensor]) -> int:
    """A tensor's device address; a zero-size tensor (an empty past) gets a 1-element
    placeholder, since TensorRT wants a valid address for every I/O tensor."""
    if t.numel():
        return t.data_ptr()
    keep.append(torch.empty(1, dtype=t.dtype, device=t.device))
    return keep[-1].data_ptr()


class TrtGraphs(BundleGraphs):
    """`BundleGraphs` whose sessions are refitted TensorRT engines (one per instance)."""

    def __init__(self, manifest: Manifest, device: torch.device) -> None:
        super().__init__(manifest)
        self.trt, self.device = _trt(), device
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)       # outlives every engine it makes
        self.scratch = Scratch(device)
        self.plans = {a.meta.get("subgraph"): a for a in self.manifest.artifacts
                      if a.kind == "trt"}
        self._bytes: dict[str, bytes] = {}

    def _plan(self, name: str) -> bytes:
        """The subgraph's plan, read and checked against its manifest sha256 once."""
        if name not in self._bytes:
            art = self.plans.get(name)
            if art is None:
                raise BundleError(f"the bundle has no TensorRT engine for subgraph {name}",
                                  "re-export the bundle on its GPU with tensorrt installed, "
                                  "or load it with backend='onnxruntime'")
            data = self.manifest.path(art.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != art.sha256:
                raise BundleError(f"{art.path} does not match its sha256 in manifest.json",
                                  "the bundle was modified or damaged; re-export it")
            self._bytes[name] = data
        return self._bytes[name]

    def _create(self, name: str, bound: dict[str, Bound]) -> TrtEngine:
        from step3_edge.export.trt import refit_engine

        with torch.cuda.device(self.device):
            plan = self._plan(name)
            try:       # a plan TensorRT cannot read deserializes to None (TypeError in refit)
                engine = refit_engine(plan, bound, self.logger, self.runtime)
            except (TypeError, RuntimeError) as e:
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                raise BundleError(f"{self.plans[name].path} is not a TensorRT engine that "
                                  f"TensorRT {self.trt.__version__} on this GPU can load with "
                                  f"its weights: {str(e)[:300]}",
                                  "engines run only on the GPU model and TensorRT version "
                                  "that built them: re-export the bundle on this machine "
                                  "(step3-edge export), or load it with "
                                  "backend='onnxruntime'") from None
            return TrtEngine(self.trt, engine, self.scratch, name)

    @property
    def active_providers(self) -> list[str]:
        return [f"TensorRT {self.trt.__version__}"] if self._sessions else []


class TrtBackend:
    """TensorRT over one bundle's engines on one CUDA device (float32 host arrays at the
    graph boundary, like `OrtBackend`)."""

    name = "tensorrt"
    caps = NO_KERNELS                   # no torch kernels: the engines run in TensorRT

    def __init__(self, manifest: Manifest | None, device: str | torch.device = "cuda",
                 dtype: torch.dtype | None = None) -> None:
        check_graph_bundle("tensorrt", manifest, dtype, "ONNX subgraphs and their TensorRT "
                           "engines", "export it for a GPU target with tensorrt installed")
        self.asked = torch.device(device)
        if self.asked.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError(f"backend='tensorrt' on device {str(self.asked)!r}",
                              "TensorRT runs on a CUDA GPU: pass device='cuda' on a machine "
                              "with one, or use backend='onnxruntime' / 'torch'")
        _trt()
        info = manifest.engines.trt
        if not info.built:
            raise ConfigError("this bundle has no TensorRT engines (at export: "
                              f"{info.reason or 'not recorded'})",
                              "re-export it on the target GPU with tensorrt installed, or "
                              "load it with backend='onnxruntime'")
        self.device, self.dtype = torch.device("cpu"), torch.float32    # what we exchange
        self.gpu = torch.device("cuda", self.asked.index or 0)
        self.graphs = TrtGraphs(manifest, self.gpu)
        self.info = info
        shapes = info.shapes or {}             # the profiles' bounds: the scheduler keeps in them
        self.limits = {k: shapes[k] for k in ("max_batch", "max_prefill", "max_context")
                       if k in shapes}

    def run(self, kind: str, feeds: dict[str, np.ndarray], layer: int | None = None,
            expert: int | None = None) -> dict[str, np.ndarray]:
        return self.graphs.run(kind, feeds, layer, expert)

    def describe(self) -> dict[str, Any]:
        subs = self.graphs.manifest.subgraphs
        return {"backend": self.name, "device": str(self.gpu), "dtype": "float32",
                "providers": self.graphs.active_providers, "engines": self.graphs.num_sessions,
                "precision": self.info.precision, "built_on": self.info.gpu,
                "kernels": {f"{n}: TensorRT": len(s.instances) for n, s in subs.items()}}
