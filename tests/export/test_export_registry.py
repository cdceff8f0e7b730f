"""A registered subgraph kind without a validation test fails the suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from step3_edge.config import Step3Config
from step3_edge.export.subgraphs import REGISTRY


def _validated_kinds() -> tuple[str, ...]:
    path = Path(__file__).with_name("test_export_validate.py")
    spec = importlib.util.spec_from_file_location("_export_validate_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert hasattr(mod, "test_subgraph_matches_reference")
    return mod.VALIDATED_KINDS


def test_every_registered_subgraph_kind_has_a_validation_test() -> None:
    validated = _validated_kinds()
    missing = sorted(set(REGISTRY) - set(validated))
    stale = sorted(set(validated) - set(REGISTRY))
    assert not missing, f"subgraph kinds without a validation test: {missing}"
    assert not stale, f"validation tests for kinds that are not registered: {stale}"


def test_every_kind_declares_io_dynamic_axes_and_instances() -> None:
    cfg = Step3Config.preset("tiny")
    for kind, decl in REGISTRY.items():
        assert decl.instances(cfg), kind
        ios = decl.inputs(cfg) + decl.outputs(cfg)
        assert ios and all(io.dtype in ("float32", "int64", "bool") for io in ios)
        dyn = {d for io in ios for d in io.shape if isinstance(d, str)}
        assert dyn and dyn <= {"batch", "seq", "past", "total", "tokens"}, (kind, dyn)
        assert decl.weight_names(cfg), kind


def test_the_split_covers_every_checkpoint_tensor_exactly_once_per_instance() -> None:
    from step3_edge.layout import expected_weights

    cfg = Step3Config.preset("tiny")
    seen: dict[str, int] = {}
    for decl in REGISTRY.values():
        for inst in decl.instances(cfg):
            if decl.kind == "vision_crop":
                continue                          # same weights as vision_global
            for w in decl.weight_names(cfg):
                key = decl.tensor(w, inst) + (f"#{inst.expert}" if decl.expert else "")
                seen[key] = seen.get(key, 0) + 1
    names = {k.split("#")[0] for k in seen}
    assert names == set(expected_weights(cfg)), set(expected_weights(cfg)) ^ names
    assert set(seen.values()) == {1}
