"""Export fixtures: `tiny` bundles written once per session (the traced graphs are cached per
process, so only the first export pays for tracing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from step3_edge.quantize.convert import convert_checkpoint

CPU_MEM = 8 << 30


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bf16: Path) -> Path:
    """cpu target with bf16 weights: every graph computes in fp32 (the exactness oracle)."""
    from step3_edge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    return export_bundle(tiny_bf16, "cpu", 1, out, cpu_mem_bytes=CPU_MEM, scheme="bf16",
                         progress=False)


@pytest.fixture(scope="session")
def cpu_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_fp8: Path) -> Path:
    """cpu target (int8_block, MatMulNBits) from the block-fp8 checkpoint, through the CLI."""
    from step3_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "cpu"
    assert main(["export", "--model", str(tiny_fp8), "--target", "cpu", "--out", str(out),
                 "--cpu-mem", "8GiB", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def l20_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bf16: Path) -> Path:
    """8 x L20 (fp8_per_channel, DequantizeLinear graphs): attention / FFN devices."""
    from step3_edge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "l20"
    return export_bundle(tiny_bf16, "l20", 8, out, cpu_mem_bytes=CPU_MEM, progress=False)


@pytest.fixture(scope="session")
def a10_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bf16: Path) -> Path:
    """4 x A10 (int8_per_channel, DequantizeLinear graphs)."""
    from step3_edge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "a10"
    return export_bundle(tiny_bf16, "a10", 4, out, cpu_mem_bytes=CPU_MEM, progress=False)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory, tiny_bf16: Path) -> dict:
    """precision -> (checkpoint folder, ONNX flavour) for the per-kind validation tests."""
    root = tmp_path_factory.mktemp("quantized")
    out = {"fp32": (tiny_bf16, "cpu")}
    for precision, target, flavour in (("int8", "cpu", "cpu"), ("fp8", "l20", "gpu"),
                                       ("int8_dq", "a10", "gpu")):
        convert_checkpoint(tiny_bf16, root / target, target, progress=False)
        out[precision] = (root / target, flavour)
    return out
