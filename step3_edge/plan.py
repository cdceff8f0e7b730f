"""The placement plan: which device runs what, which experts are hot, how much KV cache
fits. A bundle's manifest records it (`manifest.json`'s `plan`); the runtime planner
(`step3_edge.runtime.planner.plan_placement`) makes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from step3_edge.errors import PlanError

GiB = 2**30
ExpertId = tuple[int, int]            # (layer, expert)


def gib(n: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class DevicePlan:
    """One accelerator: its role and where its memory goes (bytes)."""

    index: int
    role: str                        # "attention" | "ffn" | "both"
    capacity_bytes: int
    weight_bytes: dict[str, int]     # by layout role; "experts" = the hot routed experts here
    kv_bytes: int
    kv_tokens: int
    activation_bytes: int
    headroom_bytes: int
    hot_experts: tuple[ExpertId, ...] = ()
    dense_layers: tuple[int, ...] = ()          # layers whose dense MLP runs here
    shared_expert_layers: tuple[int, ...] = ()  # layers whose shared expert runs here

    @property
    def weights_total(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def total_bytes(self) -> int:
        return self.weights_total + self.kv_bytes + self.activation_bytes + self.headroom_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes


@dataclass(frozen=True)
class Plan:
    """Where every weight lives and how much KV fits; goes into the bundle manifest."""

    target: str
    devices: int
    scheme: str
    attn_scheme: str
    kv_bytes_per_elem: float
    kv_bytes_per_token: int
    max_context: int
    num_experts: int
    moe_layers: tuple[int, ...]
    expert_bytes: int                 # one routed expert: gate + up + down
    model_weight_bytes: int           # every weight once, under these schemes
    cpu_mem_bytes: int
    kv_tokens_requested: int | None
    device_plans: tuple[DevicePlan, ...]
    cold_experts: tuple[ExpertId, ...] = field(default=())

    @property
    def attention_devices(self) -> tuple[int, ...]:
        return tuple(d.index for d in self.device_plans if d.role in ("attention", "both"))

    @property
    def ffn_devices(self) -> tuple[int, ...]:
        return tuple(d.index for d in self.device_plans if d.role in ("ffn", "both"))

    @property
    def hot(self) -> dict[int, list[ExpertId]]:
        """device -> the (layer, expert) pairs it holds."""
        return {d.index: list(d.hot_experts) for d in self.device_plans if d.hot_experts}

    @property
    def kv_tokens(self) -> int:
        """KV cache tokens over all attention devices."""
        return sum(d.kv_tokens for d in self.device_plans)

    @property
    def cold_bytes(self) -> int:
        return len(self.cold_experts) * self.expert_bytes

    @cached_property
    def _where(self) -> dict[ExpertId, int | str]:
        loc: dict[ExpertId, int | str] = {e: "cpu" for e in self.cold_experts}
        for d in self.device_plans:
            loc.update({e: d.index for e in d.hot_experts})
        return loc

    def expert_location(self, layer: int, expert: int) -> int | str:
        """Device index holding routed expert `expert` of `layer`, or "cpu" when it is cold."""
        try:
            return self._where[(layer, expert)]
        except KeyError:
            raise PlanError(f"layer {layer} expert {expert} is not a routed expert of this plan",
                            f"MoE layers are {self.moe_layers[0]}..{self.moe_layers[-1]}, "
                            f"experts 0..{self.num_experts - 1}") from None

    def expert_map(self) -> dict[int, list[int | str]]:
        """layer -> location of each of its experts (device index or "cpu")."""
        return {L: [self._where[(L, e)] for e in range(self.num_experts)]
                for L in self.moe_layers}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of `to_dict` (also after a JSON round trip)."""
        try:
            devs = tuple(DevicePlan(**{**p, "weight_bytes": dict(p["weight_bytes"]),
                                       "hot_experts": tuple(map(tuple, p["hot_experts"])),
                                       "dense_layers": tuple(p["dense_layers"]),
                                       "shared_expert_layers": tuple(p["shared_expert_layers"])})
                         for p in d["device_plans"])
            return cls(**{**d, "moe_layers": tuple(d["moe_layers"]), "device_plans": devs,
                          "cold_experts": tuple(map(tuple, d["cold_experts"]))})
        except (KeyError, TypeError) as e:
            raise PlanError(f"the device plan is malformed: {e}",
                            "re-run `step3-edge plan` / export to write a fresh plan") from e

    def format_table(self, contexts: tuple[int, ...] = (4096, 8192, 32768)) -> str:
        """Per-device memory table in GiB, then the offloaded experts and the KV capacity."""
        n_att = sum(d.role == "attention" for d in self.device_plans)
        split = (f"{n_att} attention + {self.devices - n_att} FFN" if n_att else "one device")
        lines = [f"target {self.target}, {self.devices} device(s) ({split}); weights "
                 f"{self.scheme}, attention {self.attn_scheme}, KV {self.kv_bytes_per_elem:g} "
                 f"B/elem = {self.kv_bytes_per_token:,} B/token",
                 f"model weights {gib(self.model_weight_bytes)} "
                 f"({self.model_weight_bytes / 1e9:.1f} GB) under these schemes", "",
                 f"{'dev':>3}  {'role':<9} {'weights':>8} {'KV':>7} {'act':>6} {'headrm':>6} "
                 f"{'total':>7} {'capacity':>8} {'free':>6}  hot experts"]
        for d in self.device_plans:
            g = [x / GiB for x in (d.weights_total, d.kv_bytes, d.activation_bytes,
                                   d.headroom_bytes, d.total_bytes, d.capacity_bytes,
                                   d.free_bytes)]
            lines.append(f"{d.index:>3}  {d.role:<9} {g[0]:8.2f} {g[1]:7.2f} {g[2]:6.2f} "
                         f"{g[3]:6.2f} {g[4]:7.2f} {g[5]:8.2f} {g[6]:6.2f}  "
                         f"{len(d.hot_experts)}")
        n_exp = len(self.moe_layers) * self.num_experts
        lines += ["", f"routed experts: {n_exp} x {self.expert_bytes / 1e6:.1f} MB; "
                  f"{n_exp - len(self.cold_experts)} hot on cards, {len(self.cold_experts)} "
                  f"cold in CPU memory ({gib(self.cold_bytes)} of {gib(self.cpu_mem_bytes)})"]
        per = ", ".join(f"dev {d.index}: {d.kv_tokens:,}" for d in self.device_plans
                        if d.kv_tokens)
        batches = ", ".join(f"batch {self.kv_tokens // c} at {c // 1024}K context"
                            for c in contexts if c <= self.max_context)
        lines.append(f"KV capacity: {self.kv_tokens:,} tokens ({per}) = {batches} "
                     f"(max context {self.max_context:,})")
        return "\n".join(lines)
