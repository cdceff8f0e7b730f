"""Shared fixtures: synthetic `tiny` checkpoints written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that spin at barriers crawl when another process shares the cores (the
# reference model ran 30x slower beside a busy process); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from step3_edge.config import Step3Config
from step3_edge.synth import write_checkpoint


@pytest.fixture(scope="session")
def tiny_cfg() -> Step3Config:
    return Step3Config.preset("tiny")


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Step3Config) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    return write_checkpoint(tiny_cfg, out, "bf16", seed=1234, progress=False)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Step3Config) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    return write_checkpoint(tiny_cfg, out, "block-fp8", seed=1234, progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_bf16: Path):
    from step3_edge.model import Step3ForConditionalGeneration

    return Step3ForConditionalGeneration.from_pretrained(tiny_bf16, dtype=torch.float32)


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, unseeded-per-run generator: every run draws new inputs."""
    g = torch.Generator()
    g.seed()
    return g
