"""schane.integrations: the two-view batch, transformers' Trainer and Lightning.

The models are transformers' own (a tiny ViT written with ``save_pretrained``, hf_fixtures.py) and a small conv
trunk for Lightning. Each integration is checked with 2 processes on gloo: the gradients that reach the optimizer
equal those of one process computing the same loss on the whole batch (and differ from what per-process contrast
without the gather would give, so the check can fail). The example scripts run for a few steps.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("lightning")

from hf_fixtures import write_tiny_vit  # noqa: E402
from integration_workers import (  # noqa: E402
    LABELS,
    N_CLASSES,
    PER_RANK,
    WORLD,
    _assert_same,
    _differs,
    _free_port,
    _full_batch,
    _grads,
    _hf_model,
    _lightning_module,
    _lightning_worker,
    _trainer_worker,
    _TwoViewSet,
    _views,
)
from schane.integrations.views import TwoViewCollator, TwoViewTransform  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
def test_two_view_collator_keeps_views_and_labels_aligned():
    draws = iter(range(100))
    tf = TwoViewTransform(lambda img: torch.full((1, 2, 2), float(next(draws))) + img)
    examples = [{"pixel_values": tf(torch.tensor(10.0 * i)), "label": y} for i, y in enumerate([3, 5, 7])]
    batch = TwoViewCollator()(examples)
    x, y = batch["pixel_values"], batch["labels"]
    assert x.shape == (6, 1, 2, 2) and y.tolist() == [3, 5, 7, 3, 5, 7]
    # rows i and i + B are the two views of example i, drawn separately (not the same view twice)
    assert x[:, 0, 0, 0].tolist() == [0.0, 12.0, 24.0, 1.0, 13.0, 25.0]
    single = TwoViewCollator(as_dict=False)([(torch.zeros(1, 2, 2), 1), (torch.ones(1, 2, 2), 0)])
    assert single[0].shape == (2, 1, 2, 2) and single[1].tolist() == [1, 0]
    with pytest.raises(ValueError, match="mix one view"):
        TwoViewCollator()([examples[0], {"pixel_values": torch.zeros(1, 2, 2), "label": 0}])


# --------------------------------------------------------------------------- transformers Trainer


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return write_tiny_vit(tmp_path_factory.mktemp("hf") / "vit", num_labels=N_CLASSES)


def test_trainer_two_processes_give_the_single_process_gradients(vit_dir, tmp_path):
    from schane.integrations.transformers import SCHaNeTrainerLoss

    # fork: the children reuse the transformers/Lightning this process imported (spawn re-imports them: minutes
    # on a loaded 2-core machine)
    mp.start_processes(_trainer_worker, args=(_free_port(), str(vit_dir), str(tmp_path)), nprocs=WORLD,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    batch = _full_batch()
    model, loss_fn = _hf_model(vit_dir).train(), SCHaNeTrainerLoss()
    loss_fn(model(pixel_values=batch["pixel_values"]), batch["labels"]).backward()
    want = _grads(model)
    for res in ranks:
        _assert_same(res["grads"], want)
    # the loss components reach the Trainer's logs, averaged over processes: the full batch's values
    log = ranks[0]["logs"][0]
    means = loss_fn.pop_means()
    assert log["schane_loss"] == pytest.approx(means["schane_loss"], abs=2e-4)
    assert log["ce_loss"] == pytest.approx(means["ce_loss"], abs=2e-4)
    assert log["loss"] == pytest.approx(0.9 * log["schane_loss"] + 0.1 * log["ce_loss"], abs=1e-3)

    # without the gather, each process would contrast only its own half: other gradients
    model.zero_grad()
    for half in (slice(0, PER_RANK), slice(PER_RANK, 2 * PER_RANK)):
        sub = TwoViewCollator()([_TwoViewSet(True)[i] for i in range(len(LABELS))[half]])
        (loss_fn(model(pixel_values=sub["pixel_values"]), sub["labels"]) / WORLD).backward()
    assert _differs(_grads(model), want)


def test_trainer_loss_needs_the_projection_head(vit_dir):
    from transformers import AutoModelForImageClassification

    from schane.integrations.transformers import SCHaNeTrainerLoss, remove_projection_head

    model = _hf_model(vit_dir)
    remove_projection_head(model)
    assert not any("schane" in k for k in model.state_dict())
    out = AutoModelForImageClassification.from_pretrained(vit_dir)(pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="add_projection_head"):
        SCHaNeTrainerLoss()(model(pixel_values=torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    assert "projections" not in out


# --------------------------------------------------------------------------- Lightning


def test_lightning_ddp_gives_the_single_process_gradients(tmp_path):
    mp.start_processes(_lightning_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    module = _lightning_module()
    x, y = _full_batch(as_dict=False)
    full = module.criterion(module(x), y, module.projector(module.forward_features(x)))
    full.total.backward()
    want = _grads(module)
    for res in ranks:
        _assert_same(res["grads"], want)
        assert res["logged"]["train/schane"] == pytest.approx(float(full.contrastive.detach()), abs=1e-5)
        assert res["logged"]["train/ce"] == pytest.approx(float(full.ce.detach()), abs=1e-5)

    module.zero_grad()
    for r in range(WORLD):  # DistributedSampler without shuffling: rank r holds images r, r + 2, ...
        idx = list(range(r, len(LABELS), WORLD))
        xs, ys = TwoViewCollator(as_dict=False)([_TwoViewSet(False)[i] for i in idx])
        (module.criterion(module(xs), ys, module.projector(module.forward_features(xs))).total / WORLD).backward()
    assert _differs(_grads(module), want)


# --------------------------------------------------------------------------- examples and the README section


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class_{c}").mkdir()
        for i in range(4):
            a = rng.random((24, 24, 3)) * 90
            a[..., c] += 160
            Image.fromarray(a.astype(np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


def _run_example(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    assert e.value.code == 0


def test_transformers_example_trains_and_saves_a_plain_classifier(vit_dir, image_folder, tmp_path, monkeypatch,
                                                                   capsys):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "out"
    _run_example("transformers_trainer.py", ["--model", str(vit_dir), "--data", str(image_folder), "--out", str(out),
                                             "--max-steps", "2", "--batch-size", "4"], monkeypatch)
    lines = re.findall(r"step (\d+): loss ([\d.]+) schane ([\d.]+) ce ([\d.]+)", capsys.readouterr().out)
    assert [int(s) for s, *_ in lines] == [1, 2]
    for _, total, con, ce in lines:
        assert float(total) == pytest.approx(0.9 * float(con) + 0.1 * float(ce), abs=2e-3)
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert not any("schane" in k for k in model.state_dict())


def test_lightning_example_trains(image_folder, monkeypatch, capsys):
    _run_example("lightning_module.py", ["--backbone", "test_resnet", "--data", str(image_folder), "--img-size", "32",
                                         "--max-steps", "2", "--batch-size", "4", "--devices", "1"], monkeypatch)
    m = re.search(r"after 2 steps: loss ([\d.]+) schane ([\d.]+) ce ([\d.]+)", capsys.readouterr().out)
    assert m and float(m[1]) == pytest.approx(0.9 * float(m[2]) + 0.1 * float(m[3]), abs=2e-3)


def test_compute_loss_func_in_a_stock_trainer_with_gradient_accumulation(vit_dir, tmp_path):
    """``Trainer(compute_loss_func=SCHaNeTrainerLoss())``: with 2 accumulated micro-batches the optimizer sees the
    mean of their gradients (Trainer does not divide a ``compute_loss_func``'s loss by the accumulation steps)."""
    from accelerate.state import AcceleratorState, PartialState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from schane.integrations.transformers import SCHaNeTrainerLoss

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    grads = {}

    class Keep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update(_grads(model))

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=PER_RANK, max_steps=1, optim="sgd",
                             gradient_accumulation_steps=2, train_sampling_strategy="sequential", learning_rate=0.1,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=_hf_model(vit_dir), args=args, train_dataset=_TwoViewSet(as_dict=True), callbacks=[Keep()],
            data_collator=TwoViewCollator(), compute_loss_func=SCHaNeTrainerLoss()).train()

    model, loss_fn = _hf_model(vit_dir).train(), SCHaNeTrainerLoss()
    for half in (range(0, PER_RANK), range(PER_RANK, 2 * PER_RANK)):
        sub = TwoViewCollator()([_TwoViewSet(True)[i] for i in half])
        (loss_fn(model(pixel_values=sub["pixel_values"]), sub["labels"]) / 2).backward()
    _assert_same(grads, _grads(model))


def test_plain_pytorch_example_trains(image_folder, monkeypatch, capsys):
    _run_example("plain_pytorch.py", ["--backbone", "test_resnet", "--data", str(image_folder), "--img-size", "32",
                                      "--max-steps", "2", "--batch-size", "4"], monkeypatch)
    lines = re.findall(r"step (\d+): loss ([\d.]+) schane ([\d.]+) ce ([\d.]+)", capsys.readouterr().out)
    assert [int(s) for s, *_ in lines] == [1, 2]
    assert all(float(t) == pytest.approx(0.9 * float(c) + 0.1 * float(e), abs=2e-3) for _, t, c, e in lines)


def test_readme_section_code_is_the_examples_code():
    """The python blocks of the README section "Using SCHaNe in your own training code" are verbatim excerpts
    (dedented by one level) of the example scripts that the tests above run."""
    import textwrap

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using SCHaNe in your own training code", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    examples = {p.name: p.read_text() for p in (ROOT / "examples").glob("*.py")}
    for block in blocks:
        assert any(textwrap.indent(block, "    ") in text for text in examples.values()), block[:80]
    for name in ("plain_pytorch.py", "transformers_trainer.py", "lightning_module.py"):
        assert f"examples/{name}" in section


def test_missing_extras_are_one_line_errors(monkeypatch):
    import importlib

    from schane.models.hf import require_transformers

    for mod in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'schane\[hf\]'"):
        require_transformers()
    monkeypatch.delitem(sys.modules, "schane.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'schane\[hf\]'"):
        importlib.import_module("schane.integrations.transformers")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "schane.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'schane\[lightning\]'"):
        importlib.import_module("schane.integrations.lightning")


def test_trainer_evaluates_single_view_batches_with_ce(vit_dir, tmp_path):
    from accelerate.state import AcceleratorState, PartialState
    from transformers import TrainingArguments

    from schane.integrations.transformers import SCHaNeTrainer

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    x = _views()[:, 0]  # one view per image
    eval_ds = [{"pixel_values": x[i], "labels": y} for i, y in enumerate(LABELS)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = SCHaNeTrainer(model=_hf_model(vit_dir), args=args, eval_dataset=eval_ds, proj_dim=16)
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor(LABELS))
    assert metrics["eval_loss"] == pytest.approx(float(ce), abs=1e-4)
