"""The inputs `scripts/fuzz.py` mutates: pristine tiny synthetic files, the mutators, and
one mutate-and-run function per input kind (each returns the call to run on the case)."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

ODD_VALUES: list[Any] = [0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**30, -10**9, 1.5, -0.0, 1e308,
                         float("nan"), float("inf"), float("-inf"), "", "x", "0", "128",
                         "../../etc/passwd", "/etc/passwd", "a/../../b", "\x00", "é", [], {},
                         None, True, False, [0], [128, "128"], [1, 2, 3], {"a": 1},
                         "model-00001-of-00001.safetensors"]



class Silent(Exception):
    """Accepted although it must have been refused (or the result is wrong)."""


# ---------------------------------------------------------------------------- mutation
def _slots(obj: Any, out: list) -> list:
    """Every (container, key) in a JSON value."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for k, v in list(items):
        out.append((obj, k))
        if isinstance(v, (dict, list)):
            _slots(v, out)
    return out


def mutate_json(obj: Any, r: random.Random, extra: list[Any] = ()) -> Any:
    """One random structural or value change of a JSON value (in place when possible)."""
    slots = _slots(obj, [])
    if not slots or r.random() < 0.03:
        return copy.deepcopy(r.choice(ODD_VALUES + list(extra)))
    parent, key = r.choice(slots)
    value = parent[key]
    op = r.randrange(6)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = r.choice([0, -value, value * r.choice([2, 10, 10**6, 10**12]), value + 1,
                                value - 1, float(value) + 0.5, str(value)])
    elif op == 2 and isinstance(value, str):
        parent[key] = r.choice([value + r.choice(["/..", "x", "\x00", "/", " "]), "",
                                value[:len(value) // 2], "../" + value, "/" + value])
    elif op == 3 and isinstance(value, list) and value:
        parent[key] = copy.deepcopy(r.choice([value[:-1], value + [r.choice(value)],
                                              value[::-1], [r.choice(ODD_VALUES)] + value[1:]]))
    else:
        parent[key] = copy.deepcopy(r.choice(ODD_VALUES + list(extra)))
    return obj


def corrupt_bytes(raw: bytes, r: random.Random) -> bytes:
    """Flip, cut, extend or splice bytes."""
    b = bytearray(raw)
    op = r.randrange(5)
    if op == 0 and b:
        for _ in range(r.randint(1, 8)):
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    elif op == 1:
        b = b[:r.randrange(len(b) + 1)]
    elif op == 2:
        b += bytes(r.randrange(256) for _ in range(r.randint(1, 64)))
    elif op == 3 and b:
        i = r.randrange(len(b))
        b[i:i + 16] = bytes(r.randrange(256) for _ in range(r.randint(0, 32)))
    else:
        b = bytearray(bytes(r.randrange(256) for _ in range(r.randint(0, 256))))
    return bytes(b)


def dumps(obj: Any, r: random.Random) -> bytes:
    raw = json.dumps(obj).encode()
    return corrupt_bytes(raw, r) if r.random() < 0.15 else raw


class Fuzzer:
    """Pristine tiny inputs in `work` and one mutate-and-run function per input kind."""

    def __init__(self, work: Path, onnx: bool = False) -> None:
        from step3_edge.config import Step3Config
        from step3_edge.export.bundle import export_bundle
        from step3_edge.synth import write_checkpoint

        self.work = Path(work)
        cfg = Step3Config.preset("tiny")
        self.fp8 = self.work / "pristine-fp8"
        if not self.fp8.exists():
            write_checkpoint(cfg, self.fp8, "block-fp8", seed=7, progress=False)
        self.bundle = self.work / ("pristine-bundle-onnx" if onnx else "pristine-bundle")
        if not self.bundle.exists():
            export_bundle(self.fp8, "cpu", 1, self.bundle, cpu_mem_bytes=8 << 30, onnx=onnx,
                          validate=False, progress=False)
        self.ck = self._fresh(self.fp8, self.work / "ck")
        self.bd = self._fresh(self.bundle, self.work / "bd")
        self.outside = self.work / "outside"
        self.outside.mkdir(exist_ok=True)
        self.config_data = json.loads((self.fp8 / "config.json").read_text())
        self.index_data = json.loads((self.fp8 / "model.safetensors.index.json").read_text())
        self._proc = None

    @staticmethod
    def _fresh(src: Path, dst: Path) -> Path:
        if dst.exists() or dst.is_symlink():
            shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def _restore(self, dst: Path, src: Path, names: list[str]) -> None:
        """Copy `names` from `src` back into `dst`, skipping files left as they were (same
        size and modification time: copies keep the time, every write changes it)."""
        for n in names:
            p = dst / n
            if p.is_file() and not p.is_symlink() and (src / n).is_file():
                a, b = p.stat(), (src / n).stat()
                if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
                    continue
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            if (src / n).exists():
                shutil.copy2(src / n, p)

    def processor(self):
        from step3_edge.processor import Step3Processor

        if self._proc is None:
            self._proc = Step3Processor.from_pretrained(self.fp8)
        return self._proc

    # ------------------------------------------------------------------ kinds
    def config(self, r: random.Random) -> Callable[[], None]:
        from step3_edge.checkpoint import CheckpointReader
        from step3_edge.config import Step3Config

        data = copy.deepcopy(self.config_data)
        for _ in range(r.randint(1, 3)):
            data = mutate_json(data, r)
        folder = self.work / "cfg"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_bytes(dumps(data, r))

        def run() -> None:
            cfg = Step3Config.from_pretrained(folder)
            check_config(cfg)
            CheckpointReader(self.fp8, cfg).check()
        return run

    def index_case(self, r: random.Random) -> Callable[[], None]:
        from step3_edge.checkpoint import INDEX_NAME, CheckpointReader

        self._restore(self.ck, self.fp8, [INDEX_NAME, "link.safetensors"])
        data = copy.deepcopy(self.index_data)
        shards = sorted(set(self.index_data["weight_map"].values()))
        if r.random() < 0.2:                            # a link out of the folder
            target = self.outside / "shard.safetensors"
            shutil.copyfile(self.fp8 / shards[0], target)
            (self.ck / "link.safetensors").symlink_to(target)
            name = r.choice(list(data["weight_map"]))
            data["weight_map"][name] = "link.safetensors"
        for _ in range(r.randint(1, 3)):
            data = mutate_json(data, r, shards + ["link.safetensors", "nowhere.safetensors"])
        (self.ck / INDEX_NAME).write_bytes(dumps(data, r))

        def run() -> None:
            reader = CheckpointReader(self.ck)
            reader.check()
            root = self.ck.resolve()
            for p in set(reader._where.values()):
                if root not in p.resolve().parents:
                    raise Silent(f"index resolved {p} outside the checkpoint")
            for name in r.sample(sorted(reader.expected), 3):
                if tuple(reader.read(name).shape) != reader.expected[name].shape:
                    raise Silent(f"{name} read with a wrong shape")
        return run

    def checkpoint(self, r: random.Random) -> Callable[[], None]:
        import torch
        from safetensors.torch import load_file, save_file

        from step3_edge.checkpoint import CheckpointReader

        shards = sorted(set(self.index_data["weight_map"].values()))
        self._restore(self.ck, self.fp8, ["model.safetensors.index.json", *shards])
        shard = self.ck / r.choice(shards)
        op = r.randrange(4)
        if op == 0:                                      # bytes of the file
            shard.write_bytes(corrupt_bytes(shard.read_bytes(), r))
        elif op == 1:                                    # the header JSON
            raw = shard.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            header = mutate_json(json.loads(raw[8:8 + n]), r)
            h = json.dumps(header).encode()
            length = len(h) if r.random() < 0.8 else r.randrange(2**20)
            shard.write_bytes(length.to_bytes(8, "little") + h + raw[8 + n:])
        else:                                            # values: non-finite or bad scales
            tensors = load_file(shard)
            name = r.choice(sorted(tensors))
            t = tensors[name].clone()
            flat = t.view(-1)
            value = r.choice([float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 3.0])
            if t.dtype == torch.float8_e4m3fn:
                flat.view(torch.uint8)[r.randrange(flat.numel())] = r.choice([0x7F, 0xFF, 0])
            else:
                flat[r.randrange(flat.numel())] = value
            tensors[name] = t
            save_file(tensors, shard, metadata={"format": "pt"})
        convert = r.random() < 0.1

        def run() -> None:
            reader = CheckpointReader(self.ck)
            reader.check()
            for name in reader.expected:
                w = reader.read(name)
                if not bool(torch.isfinite(w).all()):
                    raise Silent(f"{name} read with NaN or inf")
            if convert:
                from step3_edge.quantize.convert import convert_checkpoint

                out = convert_checkpoint(self.ck, self.work / "q", "cpu", overwrite=True,
                                         progress=False).out
                q = CheckpointReader(out)
                for name in q.expected:
                    if not bool(torch.isfinite(q.read(name)).all()):
                        raise Silent(f"quantized {name} holds NaN or inf")
        return run

    def mutate_bundle(self, r: random.Random, src: Path, dst: Path) -> tuple[str, int, bool]:
        """One damage to the copy `dst` of the bundle `src` (restored first): the manifest's
        JSON, a file deleted, linked from outside or its bytes changed. Returns the file,
        the operation and whether it now differs from the pristine one."""
        from step3_edge.manifest import MANIFEST

        names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        self._restore(dst, src, names)
        target = r.choice([MANIFEST] * 4 + names)
        p = dst / target
        op = r.randrange(5)
        must_fail = False
        if r.random() < 0.05:                            # no change but the layout: loads
            target = MANIFEST
            p = dst / target
            p.write_text(json.dumps(json.loads(p.read_text()), indent=r.randint(0, 4)))
        elif target == MANIFEST and op < 3:
            data = json.loads(p.read_text())
            for _ in range(r.randint(1, 3)):
                data = mutate_json(data, r, names)
            p.write_bytes(dumps(data, r))
        elif op == 0:
            p.unlink()
            must_fail = True
        elif op == 1:                                    # same bytes, linked from outside
            out = self.outside / p.name
            shutil.copyfile(p, out)
            p.unlink()
            p.symlink_to(out)
            must_fail = True
        else:
            p.write_bytes(corrupt_bytes(p.read_bytes(), r))
        changed = must_fail or p.read_bytes() != (src / target).read_bytes()
        if target == MANIFEST and changed and not must_fail:
            try:
                changed = json.loads(p.read_bytes()) != json.loads(
                    (src / target).read_bytes())
            except ValueError:
                pass
        return target, op, changed

    def bundle_case(self, r: random.Random) -> Callable[[], None]:
        target, op, changed = self.mutate_bundle(r, self.bundle, self.bd)

        def run() -> None:
            from step3_edge.export.inspect_cli import _print, summary
            from step3_edge.manifest import load_manifest
            from step3_edge.processor import Step3Processor
            from step3_edge.runtime.loading import open_bundle

            m = load_manifest(self.bd)
            _print(summary(m))
            Step3Processor.from_pretrained(self.bd)
            open_bundle(self.bd)
            load_manifest(self.bd, verify=True)
            if changed:
                raise Silent(f"{op=} on {target} passed verify")
        return run

    def image(self, r: random.Random) -> Callable[[], None]:
        from PIL import Image

        w, h = r.choice([(r.randint(1, 64), r.randint(1, 4000)), (r.randint(1, 3000),
                         r.randint(1, 3000)), (1, r.randint(1000, 100000)),
                         (r.randint(1000, 100000), 1)])
        img = Image.new(r.choice(["RGB", "L", "RGBA", "P", "I;16"]), (w, h),
                        r.randrange(1, 200))
        buf = io.BytesIO()
        img.save(buf, r.choice(["PNG", "PNG", "BMP", "GIF", "TIFF"])
                 if img.mode != "I;16" and max(w, h) < 65000 else "PNG")
        raw = buf.getvalue()
        op = r.randrange(3)
        if op == 0:
            raw = corrupt_bytes(raw, r)
        elif op == 1 and raw.startswith(b"\x89PNG"):      # IHDR size edited, CRC fixed
            dims = [r.choice([1, r.randint(1, 64), r.randint(1, 10**5), r.randint(1, 2**31 - 1)])
                    for _ in range(2)]
            ihdr = b"IHDR" + b"".join(d.to_bytes(4, "big") for d in dims) + raw[24:29]
            crc = zlib.crc32(ihdr).to_bytes(4, "big") if r.random() < 0.9 else raw[29:33]
            raw = raw[:12] + ihdr + crc + raw[33:]

        def run() -> None:
            proc = self.processor()
            views = proc.preprocess(raw)
            size = proc.cfg.vision_config.image_size
            if tuple(views.global_view.shape) != (3, size, size) or \
                    tuple(views.crops.shape[1:]) != (3, 504, 504):
                raise Silent(f"views of shape {tuple(views.global_view.shape)}")
            if views.num_tokens > proc.cfg.text_config.max_context:
                raise Silent(f"{views.num_tokens} tokens, over the context")
        return run

    def template(self, r: random.Random) -> Callable[[], None]:
        import step3_edge.chat as chat

        snippets = ["{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                    "{% endfor %}", "{{ 'ab' * 10**9 }}", "{{ x|center(10**9) }}",
                    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('xy') }}",
                    "{{ 7 ** 7 ** 7 }}", "{{ messages[0]['content'] * 99999 }}",
                    "{{ range(10)|join('-') }}", "{% if %}", "{{ raise_exception('no') }}",
                    "{{ messages|tojson }}", "{{ ''.join(['a'] * 10) }}", "{{ 1 / 0 }}",
                    "{{ '%s' % messages }}", "{% set ns = namespace(a='x') %}",
                    "{{ (messages * 9999)|length }}", "{{ messages.__class__ }}"]
        src = chat.DEFAULT_CHAT_TEMPLATE
        for _ in range(r.randint(1, 3)):                 # at tag boundaries, mostly
            cuts = [i for i in range(len(src)) if src.startswith(("{%", "{{"), i)]
            i = r.choice(cuts) if cuts and r.random() < 0.9 else r.randrange(len(src) + 1)
            src = src[:i] + r.choice(snippets) + src[i:]
        msgs = [{"role": "user", "content": "".join(chr(r.randrange(32, 0x2FF))
                                                    for _ in range(r.randint(1, 40)))}]

        def run() -> None:
            old = chat.RENDER_SECONDS
            chat.RENDER_SECONDS = 2.0
            try:
                text, _ = chat.render_chat(msgs, src)
            finally:
                chat.RENDER_SECONDS = old
            if len(text) > chat.MAX_RENDER_CHARS:
                raise Silent(f"rendered {len(text)} characters")
        return run

    def make(self, kind: str) -> Callable[[random.Random], Callable[[], None]]:
        return {"config": self.config, "index": self.index_case, "checkpoint": self.checkpoint,
                "bundle": self.bundle_case, "image": self.image,
                "template": self.template}[kind]


def check_config(cfg: Any) -> None:
    """What an accepted config must satisfy (ranges, derived sizes)."""
    for part in (cfg.text_config, cfg.vision_config):
        for k, v in vars(part).items():
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int) and not 0 <= v < 2**31 or \
                    isinstance(v, float) and not (math.isfinite(v) and v > 0):
                raise Silent(f"accepted {k} = {v!r}")
    v = cfg.vision_config
    if v.hidden_size % v.num_attention_heads or v.image_size % v.patch_size or \
            cfg.vision_tokens(504) < 1:
        raise Silent("accepted a vision config that does not divide")
    qc = cfg.quantization_config or {}
    if qc and qc.get("quant_method") not in ("fp8", "step3_edge"):
        raise Silent(f"accepted quant_method {qc.get('quant_method')!r}")
