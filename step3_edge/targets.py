"""Target profiles: one row per card. Adding a card is adding a row.

Memory is what `nvidia-smi` reports as total per card (MiB / 1024; ECC on where it is the
default, which is why a "48 GB" L20 has 45 GiB); bandwidth is the datasheet figure in GB/s.
`default_scheme` is fp8 per channel where the card has fp8 tensor cores (sm89+), int8 where it
does not; `cpu` runs int8 through ONNX Runtime's MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass

from step3_edge.errors import ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    compute_capability: tuple[int, int] | None  # None for the CPU
    memory_gib: float                           # per card
    bandwidth_gbs: float                        # per card, GB/s
    pcie_gbs: float                             # host <-> card, GB/s (one direction)
    fp8_math: bool
    default_scheme: str
    cards_per_server: int = 8

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def is_gpu(self) -> bool:
        return self.compute_capability is not None

    def device_count(self, asked: int | None = None) -> int:
        """The devices a plan or an export of this target uses: `asked`, else a whole server
        (the cpu target is one device)."""
        devices = asked if asked is not None else (self.cards_per_server if self.is_gpu else 1)
        if devices < 1:
            raise ConfigError(f"--devices {devices}", "pass at least one device")
        return devices


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("l20", "NVIDIA L20 48 GB (Ada)", (8, 9), 45.0, 864, 32, True, "fp8_per_channel"),
    Target("l40s", "NVIDIA L40S 48 GB (Ada)", (8, 9), 45.0, 864, 32, True, "fp8_per_channel"),
    Target("a6000", "NVIDIA RTX A6000 48 GB (Ampere)", (8, 6), 48.0, 768, 32, False,
           "int8_per_channel"),
    Target("a40", "NVIDIA A40 48 GB (Ampere)", (8, 6), 45.0, 696, 32, False, "int8_per_channel"),
    Target("a10", "NVIDIA A10 24 GB (Ampere)", (8, 6), 22.5, 600, 32, False, "int8_per_channel"),
    Target("rtx4090", "NVIDIA RTX 4090 24 GB (Ada)", (8, 9), 24.0, 1008, 32, True,
           "fp8_per_channel"),
    Target("t4", "NVIDIA T4 16 GB (Turing)", (7, 5), 15.0, 320, 16, False, "int8_per_channel"),
    Target("h20", "NVIDIA H20 96 GB (Hopper)", (9, 0), 95.6, 4000, 64, True, "block_fp8"),
    Target("h100", "NVIDIA H100 80 GB SXM (Hopper)", (9, 0), 79.6, 3350, 64, True, "block_fp8"),
    Target("cpu", "CPU with ONNX Runtime (int8 MatMulNBits)", None, 0, 50, 0, False,
           "int8_block", cards_per_server=1),
)}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}",
                          f"choose one of: {', '.join(TARGETS)} (or add a row to "
                          "step3_edge/targets.py)") from None
