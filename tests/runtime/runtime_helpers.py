"""Constants and helpers the runtime tests import (fixtures are in conftest.py; a module of
its own so that `from runtime_helpers import ...` does not collide with other folders'
conftest modules when pytest collects several folders in one run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

MAX_NEW = 12
FIXED_BW = {"host_to_device": 5e9, "host_memory": 1e10, "device_memory": 1e10,
            "host_flops": 1e10, "device_flops": 1e10, "measured": False}


def reference_tokens(model, ids: list[int], stop_ids: list[int], images=None,
                     max_new: int = MAX_NEW) -> list[int]:
    """The reference's greedy new tokens, without the stop token."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new, images=images,
                             stop_token_ids=tuple(stop_ids))[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] in stop_ids else out


def routed_tokens(rt, prompts: list[list[int]], gens: list) -> int:
    """Tokens that went through the layers since `rt.reset_stats()` for the finished `gens`
    of `prompts`: the prompt tokens not found in the prefix cache and every new token fed
    back (not the last one of a request that hit max_new_tokens)."""
    hit = rt.stats()["scheduler"]["prefix_cache"]["hit_tokens"]
    return sum(len(p) + len(g.token_ids) - (g.finish_reason == "length")
               for p, g in zip(prompts, gens)) - hit


def torchrun_tokens(bundle: Path, nproc: int, prompts: list[str], *extra: str,
                    timeout: float = 180) -> list[list[int]]:
    """Greedy token ids of `prompts` from `torchrun -m step3_edge.runtime.afd` with `nproc`
    processes (fp32, 6 new tokens, `extra` flags), asserting a clean exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), "-m", "step3_edge.runtime.afd", "--model", str(bundle), "--dtype",
           "float32", *extra, "--max-new-tokens", "6", "--json", *prompts]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line)["token_ids"] for line in out.stdout.splitlines()
            if line.startswith("{")]
