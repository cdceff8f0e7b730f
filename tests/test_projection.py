"""Projection of stage times from per-layer / per-expert costs, and `plan` printing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from step3_edge.config import Step3Config
from step3_edge.presets import full_slice
from step3_edge.projection import describe, measured_costs, project_load, project_stages

COSTS = {s: {"fixed_s": 10.0, "per_moe_layer_s": 20.0, "per_expert_s": 3.0,
             "per_dense_layer_s": 27.8, "per_vit_layer_s": 5.0} for s in
         ("synth", "quantize", "export")}
COSTS["load"] = {"s_per_bundle_GB": 2.0, "read_s_per_GB": 1.0}


def test_projection_is_linear_in_layers_experts_and_vit_layers() -> None:
    def export_s(*a) -> float:
        return project_stages(Step3Config.from_dict(full_slice(*a)), COSTS)["export_s"]

    assert export_s(2, 8, 2) == pytest.approx(10 + (20 + 8 * 3) + 27.8 + 2 * 5)
    assert export_s(3, 8, 2) - export_s(2, 8, 2) == pytest.approx(20 + 8 * 3)  # a MoE layer
    assert export_s(2, 16, 2) - export_s(2, 8, 2) == pytest.approx(8 * 3)  # 8 experts
    assert export_s(2, 8, 4) - export_s(2, 8, 2) == pytest.approx(2 * 5)  # 2 ViT layers
    full = project_stages(Step3Config.preset("full"), COSTS)
    assert full["export_s"] == pytest.approx(10 + 56 * (20 + 48 * 3) + 5 * 27.8 + 63 * 5)
    assert full["export_per_moe_layer_s"] == pytest.approx(20 + 48 * 3)
    assert project_load(int(100e9), COSTS) == 200.0


def test_describe_names_the_host_or_says_there_are_no_costs(tmp_path: Path) -> None:
    lines = describe(Step3Config.preset("full"), int(326e9), 0,
                     {**COSTS, "host": {"cpu": "Some CPU", "cores": 2}})
    assert "Some CPU, 2 cores" in lines[0] and any("export" in x for x in lines)
    assert measured_costs(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text(json.dumps({"synth": {}}))
    assert measured_costs(tmp_path / "bad.json") is None
    assert "no measured costs" in describe(Step3Config.preset("tiny"), 1, 0, None)[0]


def test_plan_prints_the_projection(capsys) -> None:
    from step3_edge.cli import main

    assert main(["plan", "--preset", "full", "--target", "l20", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert ("projected from real-width slices" in out) == (measured_costs() is not None)
    assert "runtime load" in out or "no measured costs" in out
