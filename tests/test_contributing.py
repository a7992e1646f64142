"""The worked examples of docs/contributing.md run as written (a loss, a dataset, a backbone, a workflow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schane.data import registry
from test_train import tiny_cfg

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"
EXAMPLES = dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_page_has_the_four_examples():
    assert sorted(EXAMPLES) == ["backbone", "dataset", "loss", "workflow"]


@pytest.mark.parametrize("name", ["loss", "backbone"])
def test_example_runs(name):
    exec(compile(EXAMPLES[name], f"contributing.md:{name}", "exec"), {"__name__": "__main__"})


def test_dataset_example_runs_and_registers_an_option_checked_set(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the example's set stays in this test
    exec(compile(EXAMPLES["dataset"], "contributing.md:dataset", "exec"), {"__name__": "__main__"})
    assert registry.dataset_info("stripes").options == ("per_class",)


def test_workflow_example_runs_on_a_trained_checkpoint(image_root, tmp_path):
    from schane.pipelines.train import train

    result = train(tiny_cfg(image_root, tmp_path, "contrib", "optim.epochs=1"))
    scope = {"__name__": "__main__", "CHECKPOINT": str(result.best_checkpoint or result.last_checkpoint)}
    exec(compile(EXAMPLES["workflow"], "contributing.md:workflow", "exec"), scope)
    assert 0.0 <= scope["acc"] <= 100.0
