"""The pathology suite's fastest runs (benchmarks/pathologies.py): a real fit induces each problem, the report read
back from the CSV names it (with its layer or step range), and a healthy run with every monitor on says nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("pathologies", ROOT / "benchmarks" / "pathologies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pathologies"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def diagnosed(suite, name: str, tmp_path: Path) -> dict:
    result = suite.run_one(name, suite.PATHOLOGIES.get(name) or getattr(suite, name), tmp_path)
    assert not result["error"], f"the {name} run failed"
    return result


def test_too_low_a_rate_is_named(suite, tmp_path):
    result = diagnosed(suite, "lr_too_low", tmp_path)
    assert [d.rule for d in result["diagnoses"]] == ["lr_too_low"]
    assert result["diagnoses"][0].value < 1e-4


def test_dead_relu_units_name_the_layer(suite, tmp_path):
    result = diagnosed(suite, "dead_relu", tmp_path)
    assert result["found"], result["diagnoses"]
    assert [d.layer for d in result["diagnoses"] if d.rule == "dead_units"] == ["model.blocks.1.act"]


@pytest.mark.slow
def test_vanishing_gradients_name_the_first_layer(suite, tmp_path):
    result = diagnosed(suite, "vanishing_gradients", tmp_path)
    assert result["found"], result["diagnoses"]
    (d,) = [d for d in result["diagnoses"] if d.rule == "vanishing_gradients"]
    assert d.layer == "model.blocks.0.linear.weight" and d.value < 1e-3


@pytest.mark.slow
def test_a_gradient_cliff_is_found_at_its_step(suite, tmp_path):
    result = diagnosed(suite, "gradient_cliff", tmp_path)
    (d,) = [d for d in result["diagnoses"] if d.rule == "gradient_cliff"]
    # the run logs its norms through GradientClipping at a threshold never reached: the action lowers it
    assert d.steps[0] == suite.CLIFF_STEP and "GradientClipping's threshold from 1e+09" in d.action


@pytest.mark.slow
def test_a_healthy_run_with_every_monitor_raises_nothing(suite, tmp_path):
    result = diagnosed(suite, "healthy_mlp", tmp_path)
    assert result["diagnoses"] == []
