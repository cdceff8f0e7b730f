"""Placement planner: which device runs what, which experts are hot, how much KV cache fits.

A pure function of config, target, device count and budgets; it never reads a weight, so
`step3-edge plan --preset full` plans the real 321B model on a laptop.

Roles (AFD, the Step3 paper's deployment layout): attention devices run data-parallel
attention, each with its own sequences, so each holds every layer's attention weights, norms
and routers, the KV cache of its sequences (one KV head: tensor parallelism would only
replicate the cache) and a replica of embed_tokens + lm_head + final norm (used every decode
step by every DP instance; one shared copy would put all logits behind one device). The
vision tower (prefill only) lives on the first attention device. FFN devices hold the dense
MLPs and the shared experts (whole units, balanced by bytes) and fill the rest of their memory
with hot routed experts (expert parallel); cold experts stay in CPU memory.
One device runs everything.

A/F split rule: the fewest attention devices whose KV room holds the KV budget asked for
(without a budget: one, giving every other device to experts; KV then takes all the room left
there). Attention-side weights and one budget's worth of KV must fit; everything else goes to
experts, so the split that maximises hot experts is the smallest that satisfies the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from step3_edge.config import Step3Config, Step3TextConfig
from step3_edge.errors import ConfigError, PlanError
from step3_edge.layout import expected_weights, layer_of
from step3_edge.plan import DevicePlan, ExpertId, GiB, Plan, gib
from step3_edge.quantize.schemes import get_scheme
from step3_edge.targets import Target

DEFAULT_ACTIVATION_RESERVE = 2 * GiB  # CUDA context, GEMM workspace, one prefill chunk
DEFAULT_HEADROOM = 0.05               # allocator fragmentation
ATTN_ROLES = ("attn", "norm", "router", "embed", "lm_head", "vision")
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as `512GiB`, `64GB`, `1.5TiB`, `300M` (bare K/M/G/T are binary)."""
    s = str(text).strip().lower().replace(" ", "").replace("_", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not math.isfinite(value) or value < 0:
        raise ConfigError(f"cannot read the size {text!r}",
                          "write a number with an optional unit, e.g. 512GiB, 64GB, 1.5TiB")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class _Sizes:
    attn_side: dict[str, int]       # replicated on every attention device (vision excluded)
    vision: int
    dense: dict[int, int]           # layer -> dense MLP bytes
    shared: dict[int, int]          # layer -> shared expert bytes
    expert: int
    total: int


def weight_bytes_by_role(cfg: Step3Config, scheme: str, attn_scheme: str | None = None,
                         vision: bool = True) -> dict[str, int]:
    """Stored bytes per layout role: linears under `scheme` (attention under `attn_scheme`),
    routers, norms, embeddings and vision in bf16 (as the step3-fp8 checkpoint keeps them)."""
    lin, att, bf = get_scheme(scheme), get_scheme(attn_scheme or scheme), get_scheme("bf16")
    out: dict[str, int] = {}
    for w in expected_weights(cfg, vision=vision).values():
        s = att if w.role == "attn" else lin if w.is_linear else bf
        out[w.role] = out.get(w.role, 0) + s.nbytes(w.shape)
    return out


def _sizes(cfg: Step3Config, scheme: str, attn_scheme: str, vision: bool) -> _Sizes:
    lin = get_scheme(scheme)
    by_role = weight_bytes_by_role(cfg, scheme, attn_scheme, vision)
    dense: dict[int, int] = {}
    shared: dict[int, int] = {}
    expert = 0
    for w in expected_weights(cfg, vision=False).values():
        layer = layer_of(w.name)
        if w.role == "mlp":
            dense[layer] = dense.get(layer, 0) + lin.nbytes(w.shape)
        elif w.role == "shared_expert":
            shared[layer] = shared.get(layer, 0) + lin.nbytes(w.shape)
        elif w.role == "experts" and layer == cfg.text_config.moe_layers[0]:
            expert += lin.nbytes(w.shape[1:])  # one expert's slice of the stacked tensor
    return _Sizes({r: by_role.get(r, 0) for r in ATTN_ROLES if r != "vision"},
                  by_role.get("vision", 0), dense, shared, expert, sum(by_role.values()))


def expert_order(cfg: Step3Config, counts: dict[int, list[int]] | None
                 ) -> tuple[list[ExpertId], dict[ExpertId, float]]:
    """Experts hottest first: by profile count, ties (and no profile) round robin over layers.
    Also the runtime's order for choosing a resident set."""
    t = cfg.text_config
    rr = [(L, e) for e in range(t.moe_num_experts) for L in t.moe_layers]
    if counts is None:
        return rr, {x: 1.0 for x in rr}
    bad = [L for L in counts if L not in t.moe_layers]
    bad_len = [L for L, c in counts.items() if len(c) != t.moe_num_experts]
    if bad or bad_len or any(v < 0 for c in counts.values() for v in c):
        raise PlanError(f"expert_counts do not fit the model: layers {bad or bad_len} are not "
                        f"MoE layers with {t.moe_num_experts} non-negative counts each",
                        f"give counts for MoE layers {t.moe_layers[0]}..{t.moe_layers[-1]} "
                        "from a profile of this model")
    w = {(L, e): float(counts[L][e]) if L in counts else 0.0 for L, e in rr}
    pos = {x: i for i, x in enumerate(rr)}
    return sorted(rr, key=lambda x: (-w[x], pos[x])), w


def _place_experts(order: list[ExpertId], weight: dict[ExpertId, float],
                   slots: dict[int, int]) -> dict[int, list[ExpertId]]:
    """Greedy: each hot expert to the device with the least load of its layer so far."""
    left = dict(slots)
    load: dict[tuple[int, int], float] = {}
    out: dict[int, list[ExpertId]] = {d: [] for d in slots}
    for x in order[:sum(slots.values())]:
        d = min((d for d in left if left[d] > 0),
                key=lambda d: (load.get((d, x[0]), 0.0), -left[d], d))
        out[d].append(x)
        left[d] -= 1
        load[(d, x[0])] = load.get((d, x[0]), 0.0) + weight[x] + 1e-9
    return out


def plan_placement(cfg: Step3Config, target: Target, devices: int, *, cpu_mem_bytes: int,
                   scheme: str | None = None, attn_scheme: str | None = None,
                   kv_tokens: int | None = None, kv_bytes_per_elem: float = 1.0,
                   attention_devices: int | None = None,
                   activation_reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE,
                   headroom_fraction: float = DEFAULT_HEADROOM,
                   expert_counts: dict[int, list[int]] | None = None,
                   vision: bool = True) -> Plan:
    """Plan `devices` cards of `target` for `cfg`; raise PlanError (with the numbers) if the
    request cannot fit. `kv_tokens=None` means at least one `max_context` sequence, and as many
    more as fit on the attention devices. `vision=False` plans a text-only deployment."""
    _check_request(devices, cpu_mem_bytes, activation_reserve_bytes, headroom_fraction,
                   kv_bytes_per_elem, kv_tokens)
    t = cfg.text_config
    scheme = scheme or target.default_scheme
    attn_scheme = attn_scheme or scheme
    sz = _sizes(cfg, scheme, attn_scheme, vision)
    order, weight = expert_order(cfg, expert_counts)
    kv_tok = math.ceil(t.num_hidden_layers * cfg.kv_bytes_per_token_per_layer(kv_bytes_per_elem))
    want = kv_tokens if kv_tokens is not None else t.max_context
    cap, cpu_budget = target.memory_bytes, cpu_mem_bytes
    if not target.is_gpu:  # the CPU itself is the one device; nothing is offloaded from it
        if devices != 1:
            raise PlanError(f"target {target.name} runs on {devices} devices",
                            "the cpu target is one device: pass --devices 1")
        cap, cpu_budget = cpu_mem_bytes, 0
    card = _Card(target.name, cap, activation_reserve_bytes, int(cap * headroom_fraction), kv_tok)
    if devices == 1:
        placed, plans = _one_device(t, sz, order, card, want, fill_kv=kv_tokens is None)
    else:
        placed, plans = _split_devices(sz, order, weight, card, devices, want,
                                       fill_kv=kv_tokens is None,
                                       attention_devices=attention_devices)
    cold = _cold_experts(order, placed, sz.expert, cpu_budget)
    for p in plans:
        assert p.total_bytes <= p.capacity_bytes, p
    return Plan(target.name, devices, scheme, attn_scheme, kv_bytes_per_elem, kv_tok,
                t.max_context, t.moe_num_experts, tuple(t.moe_layers), sz.expert, sz.total,
                cpu_mem_bytes, kv_tokens, tuple(plans), cold)


def _check_request(devices: int, cpu_mem_bytes: int, activation_reserve_bytes: int,
                   headroom_fraction: float, kv_bytes_per_elem: float,
                   kv_tokens: int | None) -> None:
    if devices < 1 or cpu_mem_bytes < 0 or activation_reserve_bytes < 0:
        raise PlanError(f"devices={devices}, cpu_mem_bytes={cpu_mem_bytes}, activation reserve "
                        f"{activation_reserve_bytes} must be >= 1, >= 0, >= 0",
                        "pass a positive device count and non-negative budgets")
    if not 0 <= headroom_fraction < 1 or kv_bytes_per_elem <= 0 or (kv_tokens or 1) < 1:
        raise PlanError(f"headroom {headroom_fraction}, KV bytes/elem {kv_bytes_per_elem}, KV "
                        f"tokens {kv_tokens} out of range", "headroom in [0, 1), KV bytes per "
                        "element > 0 (1 = fp8/int8, 2 = bf16), KV tokens >= 1")


@dataclass(frozen=True)
class _Card:
    """One card of the target as the plan divides it (bytes): its capacity, the activation
    reserve and headroom kept free, and one KV token over all layers."""

    target: str
    capacity: int
    reserve: int
    headroom: int
    kv_token: int

    @property
    def usable(self) -> int:
        """What weights and KV may take."""
        return self.capacity - self.reserve - self.headroom

    def device(self, i: int, role: str, w: dict[str, int], kv: int = 0,
               hot: tuple[ExpertId, ...] = (), dense: tuple[int, ...] = (),
               shared: tuple[int, ...] = ()) -> DevicePlan:
        return DevicePlan(i, role, self.capacity, {k: v for k, v in w.items() if v},
                          kv * self.kv_token, kv, self.reserve, self.headroom, hot, dense,
                          shared)


Placed = dict[int, list[ExpertId]]     # device -> its hot experts


def _one_device(t: Step3TextConfig, sz: _Sizes, order: list[ExpertId], card: _Card,
                want: int, fill_kv: bool) -> tuple[Placed, list[DevicePlan]]:
    """One device runs everything: every non-expert weight and `want` KV tokens must fit;
    the hottest experts fill the room left, and (`fill_kv`) more KV the rest."""
    kv_tok = card.kv_token
    fixed = sum(sz.attn_side.values()) + sz.vision + sum(sz.dense.values()) + \
        sum(sz.shared.values())
    room = card.usable - fixed
    if room < want * kv_tok:
        raise PlanError(
            f"device 0 ({card.target}) needs {gib(fixed)} of non-expert weights + "
            f"{gib(want * kv_tok)} KV ({want:,} tokens) but has {gib(card.usable)} usable "
            f"({gib(card.capacity)} - {gib(card.reserve)} activations - {gib(card.headroom)} "
            "headroom)", "use more devices, a smaller scheme or a smaller --kv-tokens")
    n_hot = min(len(order), (room - want * kv_tok) // sz.expert)
    kv = want + ((room - want * kv_tok - n_hot * sz.expert) // kv_tok if fill_kv else 0)
    w = {**sz.attn_side, "vision": sz.vision, "mlp": sum(sz.dense.values()),
         "shared_expert": sum(sz.shared.values()), "experts": n_hot * sz.expert}
    return {0: order[:n_hot]}, [card.device(0, "both", w, kv, tuple(order[:n_hot]),
                                            t.dense_layers, t.moe_layers)]


def _split_devices(sz: _Sizes, order: list[ExpertId], weight: dict[ExpertId, float],
                   card: _Card, devices: int, want: int, fill_kv: bool,
                   attention_devices: int | None) -> tuple[Placed, list[DevicePlan]]:
    """Attention devices first, each with its KV share (`_attention_kv`), then FFN devices
    (`_ffn_devices`)."""
    kv = _attention_kv(sz, card, devices, want, fill_kv, attention_devices)
    plans = [card.device(i, "attention", {**sz.attn_side, "vision": sz.vision if i == 0 else 0},
                         kv[i]) for i in range(len(kv))]
    placed, ffn = _ffn_devices(sz, order, weight, card, list(range(len(kv), devices)))
    return placed, plans + ffn


def _attention_kv(sz: _Sizes, card: _Card, devices: int, want: int, fill_kv: bool,
                  attention_devices: int | None) -> list[int]:
    """KV tokens of each attention device: `attention_devices` of them, or the fewest whose
    KV room holds `want` tokens; each takes all its room (`fill_kv`), else its share of
    `want` in proportion to its room."""
    kv_tok, attn_w = card.kv_token, sum(sz.attn_side.values())
    room = [card.usable - attn_w - (sz.vision if i == 0 else 0) for i in range(devices - 1)]
    if room[0] < 0:
        raise PlanError(
            f"attention device 0 needs {gib(attn_w + sz.vision)} of weights "
            f"(attention {gib(sz.attn_side['attn'])}, embed + lm_head "
            f"{gib(sz.attn_side['embed'] + sz.attn_side['lm_head'])}, vision "
            f"{gib(sz.vision)}) but has {gib(card.usable)} usable",
            "use a smaller --attn-scheme, --text-only, or cards with more memory")
    caps = [max(r, 0) // kv_tok for r in room]
    if attention_devices is not None:
        if not 1 <= attention_devices < devices:
            raise PlanError(f"{attention_devices} attention devices out of {devices}",
                            f"choose 1..{devices - 1} so that FFN devices remain")
        n_att = attention_devices
    else:
        n_att = next((a for a in range(1, devices) if sum(caps[:a]) >= want), devices - 1)
    if sum(caps[:n_att]) < want:
        raise PlanError(
            f"KV budget of {want:,} tokens x {kv_tok:,} B = {gib(want * kv_tok)} does "
            f"not fit: {n_att} attention device(s) hold at most {sum(caps[:n_att]):,} "
            f"tokens ({', '.join(gib(max(r, 0)) for r in room[:n_att])} free after "
            "attention-side weights)",
            "ask for fewer KV tokens (smaller --batch or --context), use more devices, "
            "or 8-bit KV")
    if fill_kv:
        return caps[:n_att]
    kv = [want * c // sum(caps[:n_att]) for c in caps[:n_att]]
    for i in [i for i in range(n_att) if kv[i] < caps[i]][:want - sum(kv)]:
        kv[i] += 1
    return kv


def _ffn_devices(sz: _Sizes, order: list[ExpertId], weight: dict[ExpertId, float],
                 card: _Card, ffn: list[int]) -> tuple[Placed, list[DevicePlan]]:
    """FFN devices: dense MLPs and shared experts as whole units, largest first onto the
    least filled device; hot routed experts in the room left (`_place_experts`)."""
    units = sorted([(b, "d", L) for L, b in sz.dense.items()]
                   + [(b, "s", L) for L, b in sz.shared.items()], key=lambda u: -u[0])
    fixed = {d: 0 for d in ffn}
    owned: dict[int, list[tuple[str, int]]] = {d: [] for d in ffn}
    for b, kind, L in units:
        d = min(ffn, key=lambda d: (fixed[d], d))
        fixed[d] += b
        owned[d].append((kind, L))
    short = [d for d in ffn if fixed[d] > card.usable]
    if short:
        raise PlanError(
            f"FFN device {short[0]} needs {gib(fixed[short[0]])} for dense MLPs and shared "
            f"experts but has {gib(card.usable)} usable ({len(ffn)} FFN devices)",
            "use more devices, fewer attention devices or a smaller --scheme")
    placed = _place_experts(order, weight, {d: (card.usable - fixed[d]) // sz.expert
                                            for d in ffn})
    plans = []
    for d in ffn:
        dl = tuple(sorted(L for k, L in owned[d] if k == "d"))
        sl = tuple(sorted(L for k, L in owned[d] if k == "s"))
        w = {"mlp": sum(sz.dense[L] for L in dl), "shared_expert":
             sum(sz.shared[L] for L in sl), "experts": len(placed[d]) * sz.expert}
        plans.append(card.device(d, "ffn", w, 0, tuple(placed[d]), dl, sl))
    return placed, plans


def _cold_experts(order: list[ExpertId], placed: Placed, expert_bytes: int,
                  cpu_budget: int) -> tuple[ExpertId, ...]:
    """The experts no device holds, which must fit the CPU budget."""
    hot = {x for xs in placed.values() for x in xs}
    cold = tuple(sorted(x for x in order if x not in hot))
    if len(cold) * expert_bytes > cpu_budget:
        raise PlanError(
            f"{len(cold)} cold experts x {expert_bytes / 1e6:.1f} MB = "
            f"{gib(len(cold) * expert_bytes)} must live in CPU memory, but the CPU budget is "
            f"{gib(cpu_budget)}",
            f"give --cpu-mem >= {gib(len(cold) * expert_bytes)}, use more devices, a smaller "
            "KV budget or a smaller --scheme")
    return cold
