"""Stacked experts (runtime/stacked_experts.py): every expert of a layer in two GEMMs for
decode-sized batches on the CPU. Same bits as each expert's own SwiGLU and as the reference
model on tiny / mini shapes; used only where it is exact and nothing can miss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import FIXED_BW

from step3_edge.errors import ConfigError
from step3_edge.quantize.schemes import get_scheme
from step3_edge.runtime import Step3Runtime, native
from step3_edge.runtime.backends import TorchBackend
from step3_edge.runtime.cost_model import Bandwidths
from step3_edge.runtime.mlp import make_mlp
from step3_edge.runtime.stacked_experts import MAX_ROWS, StackedExperts

BF16 = TorchBackend("cpu", torch.bfloat16, native_kernels=False)   # oneDNN: exact bits
needs_packed = pytest.mark.skipif(not BF16.caps.fast_bf16_gemm,
                                  reason="no oneDNN bf16 on this CPU")


def _experts(n: int, h: int, m: int, g: torch.Generator) -> list:
    sch = get_scheme("bf16")

    def lin(out: int, inp: int):
        w = torch.randn(out, inp, generator=g) / inp ** 0.5
        return BF16.linear(sch, sch.quantize(w), (out, inp))

    return [make_mlp(lin(m, h), lin(m, h), lin(h, m)) for _ in range(n)]


@needs_packed
@pytest.mark.parametrize("shape", [(8, 128, 96), (48, 512, 256)], ids=["tiny", "mini"])
def test_stacked_equals_each_expert_bit_for_bit(shape: tuple[int, int, int]) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    n_exp, h, m = shape
    mlps = _experts(n_exp, h, m, g)
    stack = StackedExperts(mlps, Bandwidths(**FIXED_BW))
    for rows in (1, 3, 16, MAX_ROWS):
        x = torch.randn(rows, h, generator=g).to(torch.bfloat16)
        experts = torch.randint(0, n_exp, (3 * rows,), generator=g)
        row_ids = torch.randint(0, rows, (3 * rows,), generator=g)
        got = stack(x, experts, row_ids)
        for i, (e, r) in enumerate(zip(experts.tolist(), row_ids.tolist())):
            # the expert alone on its row, and the reference's three F.linear calls
            own = mlps[e](x[r:r + 1])[0]
            lin = torch.nn.functional.linear
            ref = lin(torch.nn.functional.silu(lin(x[r], mlps[e].gate_proj.weight))
                      * lin(x[r], mlps[e].up_proj.weight), mlps[e].down_proj.weight)
            assert torch.equal(got[i], own) and torch.equal(own, ref), (rows, i, e)


@needs_packed
def test_stacked_path_is_chosen_by_the_cost_model() -> None:
    """The stack reads all E experts at half the copy rate; one by one, each chosen expert
    costs `cpu_overhead` plus its read. It takes decode-sized calls that choose at least as
    many experts as that makes worth it; halving the bandwidth raises the bar."""
    mlps = _experts(48, 512, 256, torch.Generator().manual_seed(0))
    each = 3 * 512 * 256 * 2                                   # bytes of one bf16 expert
    bars = []
    for bw in (3e10, 1.5e10):
        stack = StackedExperts(mlps, Bandwidths(**{**FIXED_BW, "host_memory": bw,
                                                   "cpu_overhead": 1e-4}))
        assert stack.nbytes == 48 * each
        want = (2 * 48 * each / bw) / (1e-4 + 2 * each / bw)     # 16.5 and 24.4 experts
        assert stack.min_touched == pytest.approx(want)
        t = int(want) + 1
        assert stack.wanted(16, t) and stack.wanted(MAX_ROWS, t)
        assert not stack.wanted(16, t - 1)               # few experts: read only those
        assert not stack.wanted(MAX_ROWS + 1, 48)        # prefill: each expert on its rows
        bars.append(want)
    assert 16 < bars[0] < 17 and 24 < bars[1] < 25


@needs_packed
def test_runtime_decode_batch_bit_identical_with_and_without_stacking(bundle: Path) -> None:
    """A batch of 12 decoding sequences (bf16, all resident): logits of every step equal the
    per-expert path's (both through oneDNN: the native GEMV would take experts chosen by at
    most 8 rows), and the stacked path served the MoE layers."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 20, (12,), generator=g)]
    logits = {}
    kw = dict(dtype="bfloat16", device="cpu", bandwidths=FIXED_BW, vision=False,
              native_kernels=False)
    for on in (True, False):
        with Step3Runtime.load(bundle, stacked_experts=on, **kw) as rt:
            eng = rt.engine
            store = eng.ffn.store.summary()
            assert store["stacked_layers"] == (2 if on else 0)      # tiny: 2 MoE layers
            assert store["strategy"] == ("stacked" if on else "per expert")
            assert store["stacked_off"] == ("" if on else "stacked_experts=False")
            with torch.inference_mode(), rt.scheduler.engine_lock:
                seqs = [eng.attn.kv.allocate(len(p) + 4) for p in prompts]
                for s, p in zip(seqs, prompts):
                    eng.run([(s, len(p))], eng.attn.embed_tokens(p))
                toks, steps = [p[-1] for p in prompts], []
                for _ in range(3):
                    out = eng.run([(s, 1) for s in seqs], eng.attn.embed_tokens(toks)).clone()
                    steps.append(out)
                    toks = out.argmax(-1).tolist()
            logits[on] = torch.stack(steps)
            st = rt.stats()["experts"]
        assert (st["stacked"] >= 3 * 2) if on else st["stacked"] == 0
        if on:
            assert st["stacked_bytes"] == 2 * 8 * 3 * 96 * 128 * 2      # a second copy
    assert torch.equal(logits[True], logits[False])


def test_stacking_only_where_nothing_can_miss(bundle: Path, monkeypatch) -> None:
    """Stacked only when no expert can miss (a miss would bypass the stack), the weights are
    prepacked bf16, a second copy leaves memory free, and (by default) the native GEMV does
    not run the experts; stats say why not."""
    kw = dict(device="cpu", bandwidths=FIXED_BW, vision=False, native_kernels=False)
    cases = [({"dtype": "bfloat16", "resident": 0.5}, "does not hold every routed expert"),
             ({"dtype": "float32"}, "not oneDNN-prepacked bf16"),
             ({"dtype": "bfloat16", "stacked_experts": False}, "stacked_experts=False")]
    if native.kernel() is not None:       # by default the native GEMV's per-expert path
        cases.append(({"dtype": "bfloat16", "native_kernels": None}, "native GEMV runs"))
    for opts, why in cases:
        with Step3Runtime.load(bundle, **{**kw, **opts}) as rt:
            assert rt.stats()["experts"]["stacked_layers"] == 0
            assert why in rt.stats()["experts"]["stacked_off"]
    from step3_edge.runtime import expert_compute

    class Tight:                      # 1 GiB available: under the 2 GiB left free
        available = 1 << 30

    monkeypatch.setattr(expert_compute.psutil, "virtual_memory", lambda: Tight)
    with Step3Runtime.load(bundle, dtype="bfloat16", **kw) as rt:
        assert rt.stats()["experts"]["stacked_layers"] == 0
        assert "GiB free" in rt.stats()["experts"]["stacked_off"]
    with pytest.raises(ConfigError, match="stacked_experts"):
        Step3Runtime.load(bundle, stacked_experts="yes", **kw)


def test_start_up_rates_are_measured_at_the_engine_threads(bundle: Path, monkeypatch) -> None:
    """The cost model (and so the stack's choice) reads a copy rate that grows with threads:
    a runtime whose engine runs on 1 thread measures with 1, whatever the loader's count."""
    from step3_edge.runtime import loading

    seen: list[int] = []
    real = loading.measure_bandwidths

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "measure_bandwidths", spy)
    before = torch.get_num_threads()
    with Step3Runtime.load(bundle, device="cpu", dtype="bfloat16", vision=False, threads=1):
        pass
    assert seen == [1] and torch.get_num_threads() == before


@needs_packed
def test_afd_ffn_rank_stacks_and_matches_one_process(bundle: Path) -> None:
    """Under AFD the FFN rank (one rank: every expert in its store) stacks too: bf16 greedy
    tokens of a decode batch equal the one-process runtime's, and the rank reports stacked
    layer calls."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 20, (10,), generator=g)]
    kw = dict(dtype="bfloat16", device="cpu", bandwidths=FIXED_BW, vision=False,
              stacked_experts=True)           # also beside the native GEMV, where it runs
    with Step3Runtime.load(bundle, **kw) as rt:
        want = [o.token_ids for o in rt.generate(prompts, max_new_tokens=6)]
    with Step3Runtime.load(bundle, afd=True, ffn_ranks=1, micro_batches=1, afd_threads=1,
                           afd_timeout=60, **kw) as rt:
        got = [o.token_ids for o in rt.generate(prompts, max_new_tokens=6)]
        s = rt.stats()["experts"]
    assert got == want
    assert s["stacked"] > 0 and s["ranks"][0]["stacked_layers"] == 2
