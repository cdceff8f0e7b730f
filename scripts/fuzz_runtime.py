"""The input kinds of `scripts/fuzz.py` that load a bundle in the runtime and generate:

    runtime   a damaged bundle (no graphs), or odd load options, prompts and sampling, through
              `Step3Runtime.load` + one short generation (torch backend)
    onnx      a bundle exported with its ONNX graphs, damaged (graph bytes with or without a
              matching hash in the manifest, a graph swapped for another, a manifest edit
              re-hashed), through `Step3Runtime.load(backend="onnxruntime")` + one generation

An accepted case must give well-formed tokens, and an undamaged bundle with greedy sampling
the pristine bundle's tokens."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

from fuzz_inputs import ODD_VALUES, Silent, corrupt_bytes, mutate_json
from fuzz_inputs import Fuzzer as InputKinds

PROMPT, NEW_TOKENS = "a small fuzzing prompt", 3
# load options the runtime kind varies (the AFD ones spawn processes: left out)
OPTIONS: dict[str, list[Any]] = {
    "kv_tokens": [16, 64, 4096, 2**31, 10**30], "max_batch": [1, 2, 64, 2**40],
    "max_prefill_tokens": [1, 8, 512, 2**40], "resident": [0, 1, 0.0, 0.5, 1.0, 2.0, -1, 10**9],
    "threads": [1, 2, 2**20], "ort_threads": [1, 2**20], "dtype": ["float32", "bfloat16",
    "auto", "float8", "int4"], "device": ["cpu", "cuda", "meta", "cpu:7"],
    "backend": ["torch", "auto", "onnxruntime", "tensorrt", "numpy"], "verify": [True, False],
    "prefix_cache": [True, False], "vision": [True, False], "stacked_experts": [None, True,
    False], "native_kernels": [None, True, False], "prefetch": [True, False],
    "kv_dtype": ["float32", "bfloat16", "fp8", "float8_e4m3fn", "int8"],
    "miss_policy": ["fetch", "cpu", "auto", "drop"], "sync_timing": [True, False]}


def with_image(prompt: Any, image: bool) -> tuple[Any, list[Any] | None]:
    """(prompt, images): with `image`, one 600 x 300 picture (two crops and the global view)
    before the text."""
    if not image:
        return prompt, None
    from PIL import Image

    return f"<im_patch> {prompt}", [Image.new("RGB", (600, 300), (40, 90, 160))]


class Fuzzer(InputKinds):
    """The file and request kinds of `fuzz_inputs.Fuzzer`, and the runtime and onnx kinds
    (the pristine ONNX bundle is exported on first use)."""

    def __init__(self, work: Path, onnx: bool = False) -> None:
        super().__init__(work, onnx)
        self._tokens: dict[tuple[str, str], list[int]] = {}

    def make(self, kind: str) -> Callable[[random.Random], Callable[[], None]]:
        extra = {"runtime": self.runtime_case, "onnx": self.onnx_case}
        return extra[kind] if kind in extra else super().make(kind)

    def fresh_copy(self, src: Path, dst: Path) -> Path:
        """`dst` as a copy of the bundle `src` (only what changed is copied again)."""
        if not dst.exists():
            return self._fresh(src, dst)
        for p in dst.rglob("*"):                          # files a case added
            if (p.is_file() or p.is_symlink()) and not (src / p.relative_to(dst)).exists():
                p.unlink()
        self._restore(dst, src, sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                                       if p.is_file()))
        return dst

    def onnx_bundle(self) -> Path:
        from step3_edge.export.bundle import export_bundle

        out = self.work / "pristine-bundle-onnx"
        if not out.exists():
            export_bundle(self.fp8, "cpu", 1, out, cpu_mem_bytes=8 << 30, onnx=True,
                          validate=False, progress=False)
        return out

    def pristine_tokens(self, bundle: Path, backend: str, image: bool) -> list[int]:
        from step3_edge.runtime import Step3Runtime

        key = (str(bundle), backend, image)
        if key not in self._tokens:
            with Step3Runtime.load(bundle, backend=backend) as rt:
                self._tokens[key] = rt.generate(*with_image(PROMPT, image),
                                                max_new_tokens=NEW_TOKENS).token_ids
        return self._tokens[key]

    # ------------------------------------------------------------------ runtime
    def runtime_case(self, r: random.Random) -> Callable[[], None]:
        from step3_edge.sampling import SamplingParams

        dst = self.fresh_copy(self.bundle, self.work / "rt")
        changed, options = False, {}
        prompt: Any = PROMPT
        new_tokens: Any = NEW_TOKENS
        sampling: Any = None
        seed: Any = None
        if r.random() < 0.5:                              # a damaged bundle
            _, _, changed = self.mutate_bundle(r, self.bundle, dst)
            options["verify"] = r.random() < 0.3
        else:                                             # odd options and requests
            known = self.load_keywords()
            for key in r.sample(sorted(k for k in OPTIONS if k in known), r.randint(0, 3)):
                options[key] = r.choice(OPTIONS[key] if r.random() < 0.8 else ODD_VALUES)
            if r.random() < 0.3:
                prompt = r.choice([[], [0], [2**40], [-1], [1, 2, 3], "", "\ud800", "é" * 3000,
                                   "<im_patch>" * 5, b"bytes", None, 7, ["a", "b"]])
            if r.random() < 0.3:
                new_tokens = r.choice([0, -1, 1, 2**31, 10**30, 1.5, "3", None, True])
            if r.random() < 0.3:
                vals = [r.choice([0, 0.7, float("nan"), float("inf"), -1, 2**31, "1"]),
                        r.choice([0, 1, 5, -1, 2**40, 1.5]),
                        r.choice([1.0, 0.5, 0, float("nan"), 2, -0.1])]
                sampling = (lambda v=vals: SamplingParams(*v))
            if r.random() < 0.2:
                seed = r.choice([0, 1, -1, 2**64, 2**64 - 1, 1.5, "1", True])
        pristine = not changed and not options and prompt == PROMPT and \
            new_tokens == NEW_TOKENS and sampling is None
        return self._load_and_generate(dst, "torch", options, prompt, new_tokens, sampling,
                                       seed, pristine, changed and options.get("verify"))

    # ------------------------------------------------------------------ onnx
    def onnx_case(self, r: random.Random) -> Callable[[], None]:
        from step3_edge.manifest import MANIFEST, sha256_file

        src = self.onnx_bundle()
        dst = self.fresh_copy(src, self.work / "ox")
        graphs = sorted(p.relative_to(src).as_posix() for p in (src / "onnx").glob("*.onnx"))
        op = r.randrange(6)
        target = r.choice(graphs)
        image = r.random() < 0.3                          # crops: every graph runs
        used = image or "vision" not in target            # sessions are made on first use
        rehash, must_fail = True, False
        if op == 0:                                       # graph bytes, hash kept
            (dst / target).write_bytes(corrupt_bytes((dst / target).read_bytes(), r))
            rehash = False
            must_fail = used and (dst / target).read_bytes() != (src / target).read_bytes()
        elif op == 1:                                     # graph bytes, hash made to match
            (dst / target).write_bytes(corrupt_bytes((dst / target).read_bytes(), r))
        elif op == 2:                                     # another graph of the bundle
            other = r.choice([g for g in graphs if g != target])
            shutil.copyfile(src / other, dst / target)
            must_fail = used
        elif op == 3:                                     # a manifest edit, re-hashed
            data = json.loads((dst / MANIFEST).read_text())
            part = r.choice(["subgraphs", "subgraphs", "engines", "artifacts", "plan"])
            data[part] = mutate_json(copy.deepcopy(data[part]), r, graphs)
            self.write_manifest(dst, data)
            rehash = False
        elif op == 4:                                     # an ONNX-kind artifact's bytes
            self.mutate_bundle(r, src, dst)
            rehash = False
        else:                                             # undamaged
            rehash = False
        if rehash:
            data = json.loads((dst / MANIFEST).read_text())
            for a in data["artifacts"]:
                if a["path"] == target:
                    a["sha256"], a["bytes"] = sha256_file(dst / target), \
                        (dst / target).stat().st_size
            self.write_manifest(dst, data)
        changed = any((dst / n).read_bytes() != (src / n).read_bytes() for n in graphs
                      + [MANIFEST] if (dst / n).is_file()) or \
            any(not (dst / n).is_file() for n in graphs)
        return self._load_and_generate(dst, "onnxruntime", {}, PROMPT, NEW_TOKENS, None,
                                       None, not changed, must_fail, src, image)

    # ------------------------------------------------------------------ shared
    @staticmethod
    def load_keywords() -> set[str]:
        from step3_edge.runtime.api import OVERRIDES

        return set(OVERRIDES)

    @staticmethod
    def write_manifest(bundle: Path, data: dict[str, Any]) -> None:
        from step3_edge.manifest import CONTENT_HASH, write_manifest

        data.pop(CONTENT_HASH, None)
        data.pop("schema_version", None)
        try:
            write_manifest(bundle, data)
        except (TypeError, ValueError):                   # a value JSON cannot hold: as is
            (bundle / "manifest.json").write_text(json.dumps(data, default=str))

    def _load_and_generate(self, bundle: Path, backend: str, options: dict[str, Any],
                           prompt: Any, new_tokens: Any, sampling: Any, seed: Any,
                           pristine: bool, must_fail: bool, src: Path | None = None,
                           image: bool = False) -> Callable[[], None]:
        def run() -> None:
            from step3_edge.runtime import Step3Runtime

            ref = self.pristine_tokens(src or self.bundle, backend, image) if pristine \
                else None
            kw = {"backend": backend, **options}
            with Step3Runtime.load(bundle, **kw) as rt:
                out = rt.generate(*with_image(prompt, image), max_new_tokens=new_tokens,
                                  seed=seed,
                                  sampling=sampling() if callable(sampling) else sampling)
                vocab = rt.config.text_config.vocab_size
            gens = out if isinstance(out, list) else [out]
            if must_fail:
                raise Silent(f"a damaged bundle loaded and generated {gens[0].token_ids}")
            for g in gens:
                if not isinstance(new_tokens, int) or not 0 < len(g.token_ids) <= new_tokens \
                        or not all(0 <= t < vocab for t in g.token_ids) or \
                        g.finish_reason not in ("stop", "length"):
                    raise Silent(f"generated {g.token_ids} ({g.finish_reason}) for "
                                 f"max_new_tokens={new_tokens!r}")
            if ref is not None and (len(gens) != 1 or gens[0].token_ids[:len(ref)] !=
                                    ref[:len(gens[0].token_ids)]):
                raise Silent(f"an undamaged bundle generated {gens[0].token_ids}, expected "
                             f"{ref}")
        return run
