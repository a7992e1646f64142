"""The workflow layer: import direction, shared set-up, run directories, clear CLI errors, readable logs."""

from __future__ import annotations

import ast
import json
import logging
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from schane.cli import main
from schane.config import load_config
from schane.engine.checkpoint import load_checkpoint
from schane.pipelines.runs import check_config, load_run_config
from schane.pipelines.train import train
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "schane"
LIBRARY = ("losses", "data", "models", "engine", "fewshot", "analysis", "config.py", "distributed.py", "memory.py",
           "progress.py")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _files(*parts: str) -> list[Path]:
    files = []
    for p in parts:
        q = SRC / p
        files += sorted(q.rglob("*.py")) if q.is_dir() else [q]
    return files


def test_library_packages_never_import_the_workflows_or_the_cli():
    bad = [(f.relative_to(SRC), m) for f in _files(*LIBRARY) for m in _imports(f)
           if m.startswith(("schane.pipelines", "schane.cli"))]
    assert bad == []
    # the losses depend on nothing else in schane
    losses = [(f.name, m) for f in _files("losses") for m in _imports(f)
              if m.startswith("schane") and not m.startswith("schane.losses")]
    assert losses == []


def test_dataset_loading_for_a_run_is_written_once_outside_the_data_package():
    calls = []
    for f in SRC.rglob("*.py"):
        if f.is_relative_to(SRC / "data"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get_dataset":
                calls.append(str(f.relative_to(SRC)))
    assert calls == ["pipelines/splits.py"]


def test_no_function_is_longer_than_100_lines():
    long = []
    for f in SRC.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 100:
                long.append(f"{f.relative_to(SRC)}:{n.lineno} {n.name}")
    assert long == []


def test_progress_in_a_log_is_a_few_lines_not_bar_frames(caplog, capsys):
    from schane.progress import progress

    caplog.set_level(logging.INFO, logger="schane")
    assert sum(progress(range(250), desc="work", log=True)) == sum(range(250))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("work:")]
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("work: 250/250")
    assert list(progress(range(7), desc="inner")) == list(range(7))  # inner loops stay silent
    assert not any(r.getMessage().startswith("inner") for r in caplog.records)
    assert "\r" not in capsys.readouterr().err


def _yaml(tmp_path: Path, root: Path, **extra: str) -> Path:
    cfg = {"name": "cli", "output_dir": str(tmp_path / "runs"), "model": {"backbone": "test_convnext", "pretrained": False},
           "data": {"name": "image_folder", "root": str(root), "img_size": 32, "batch_size": 4},
           "optim": {"epochs": 1, "warmup_epochs": 0, "base_batch_size": None, "layer_decay": None},
           "train": {"max_steps_per_epoch": 2, "progress": False}}
    p = tmp_path / "run.yaml"
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return p


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("schane ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_yaml_names_the_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\noptim:\n  lr: [1, 2\n  epochs: 3\n")
    assert main(["train", "--config", str(p)]) == 2
    err = _error(capsys)
    assert str(p) in err and "line 4" in err


def test_unusable_output_paths_are_one_line_errors(image_root, tmp_path, capsys):
    cfg = _yaml(tmp_path, image_root)
    (tmp_path / "afile").write_text("x")
    for override, needle in [
        (f"output_dir={tmp_path / 'afile'}", "is a file"),
        (f"output_dir={tmp_path / 'afile' / 'deeper'}", "is a file"),
        ("output_dir=/sys/schane-cannot-write", "cannot create the run directory"),
    ]:
        assert main(["train", "--config", str(cfg), "--set", override]) == 2
        assert needle in _error(capsys), override
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cli").write_text("a file where the run directory goes")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "set another name" in _error(capsys)


def test_offline_hub_weights_are_a_one_line_error(image_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    cfg = _yaml(tmp_path, image_root)
    assert main(["train", "--config", str(cfg), "--set", "model.backbone=resnet18", "model.pretrained=true"]) == 2
    assert "model.checkpoint" in _error(capsys)


def test_errors_inside_dataloader_workers_show_the_original_message(image_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    for f in sorted((root / "class_0").iterdir())[:12]:
        f.write_bytes(b"not an image")
    cfg = _yaml(tmp_path, root)
    assert main(["train", "--config", str(cfg), "--set", "data.num_workers=1"]) == 2
    err = _error(capsys)
    assert "cannot decode image file" in err and "DataLoader worker" not in err
    # the worker (which ignores SIGTERM) is stopped, not left to block the interpreter's exit
    assert multiprocessing.active_children() == []


def test_a_full_disk_says_how_much_space_the_checkpoint_needs(image_root, tmp_path, monkeypatch, capsys):
    import schane.engine.checkpoint as ckpt

    def no_space(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed ... unexpected pos 1234 vs 1233")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1 << 19))
    cfg = _yaml(tmp_path, image_root)
    assert main(["train", "--config", str(cfg)]) == 2
    err = _error(capsys)
    assert "no space left" in err and "MB are free" in err and "needs about" in err
    assert not list((tmp_path / "runs" / "cli").glob(".*.tmp"))  # the temporary was removed


def test_resume_of_a_finished_run_changes_nothing(image_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="schane")
    cfg = tiny_cfg(image_root, tmp_path, "done")
    res = train(cfg)
    final = (res.run_dir / "final.json").read_text()
    stamp = res.last_checkpoint.stat().st_mtime_ns
    again = train(cfg, resume="auto")
    assert "the run is finished" in caplog.text
    assert (res.run_dir / "final.json").read_text() == final and again.metrics == json.loads(final)
    assert res.last_checkpoint.stat().st_mtime_ns == stamp and again.best_checkpoint == res.best_checkpoint


def test_stale_checkpoint_temporaries_are_removed_on_start(image_root, tmp_path):
    cfg = tiny_cfg(image_root, tmp_path, "stale", "optim.epochs=2")
    res = train(cfg)
    stale = res.run_dir / ".last.pt.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)  # what a run killed while writing a checkpoint leaves
    (res.run_dir / "final.json").unlink()
    state = load_checkpoint(res.last_checkpoint)
    state["epoch"] = 1  # pretend the run stopped after its first epoch
    torch.save(state, res.last_checkpoint)
    train(cfg, resume="auto")
    assert not stale.exists() and (res.run_dir / "final.json").is_file()


def test_checkpoints_store_class_names_and_eval_refuses_other_classes(image_root, tmp_path, capsys):
    res = train(tiny_cfg(image_root, tmp_path, "names"))
    assert load_checkpoint(res.best_checkpoint)["class_names"] == ["class_0", "class_1", "class_2"]
    renamed = tmp_path / "renamed"
    shutil.copytree(image_root, renamed)
    (renamed / "class_2").rename(renamed / "zebra")
    ckpt = str(res.best_checkpoint)
    assert main(["eval", "--checkpoint", ckpt, "--data", str(renamed), "--split", "val"]) == 2
    err = _error(capsys)
    assert "class_2" in err and "zebra" in err and "--allow-class-mismatch" in err
    assert main(["eval", "--checkpoint", ckpt, "--data", str(renamed), "--split", "val", "--allow-class-mismatch"]) == 0
    assert main(["analyze", "--checkpoint", ckpt, "--data", str(renamed), "--out", str(tmp_path / "an")]) == 2
    assert "zebra" in _error(capsys)


def test_protocol_b_fine_tunes_with_the_run_loss_config(monkeypatch):
    import schane.fewshot as fewshot
    from schane.pipelines.scoring import FewShotViews, fewshot_accuracies

    seen = {}

    def fake(model, episodes, support, ev, **kw):
        seen.update(kw)
        return {s: np.arange(len(episodes)) + 10 * i for i, s in enumerate(kw["settings"])}

    monkeypatch.setattr(fewshot, "evaluate_protocol_b_grid", fake)
    cfg = load_config(None, ["fewshot.protocol=B", "fewshot.finetune_loss=joint", "loss.positive_mode=each",
                             "loss.lam=0.7", "loss.beta=0.5", "train.progress=false", "fewshot.finetune_params=all"])
    views = FewShotViews(eval={"s": None}, support={"s": None})
    grid = fewshot.settings_grid(cfg.fewshot.finetune_steps, cfg.fewshot.finetune_lr)
    out = fewshot_accuracies(torch.nn.Linear(2, 2), cfg, views, "s", {1: [object()], 5: [object()] * 2}, grid,
                             device=torch.device("cpu"))  # one call for both shots, split again by shot
    assert list(out) == [(1, s) for s in grid] + [(5, s) for s in grid] and seen["params"] == "all"
    assert seen["settings"] == grid and out[(1, grid[1])].tolist() == [10] and out[(5, grid[1])].tolist() == [11, 12]
    crit = seen["criterion"]
    assert crit.lam == 0.7 and crit.contrastive.positive_mode == "each" and crit.contrastive.beta == 0.5
    with pytest.raises(ValueError, match=r"\(steps, lr\) settings"):
        fewshot_accuracies(torch.nn.Linear(2, 2), cfg, views, "s", {1: [object()]}, [1.0], device=torch.device("cpu"))


@pytest.mark.parametrize("override, message", [
    ("name=010", None), ("output_dir=2024.10", None),
    ("optim.min_lr=1", "optim.min_lr"), ("optim.lr=true", "optim.lr"), ("loss.temperature=yes", "loss.temperature"),
    ("data.options.foo=1", "data.options.foo"), ("aug.hflip=2", "aug.hflip"), ("fewshot.support_aug=-1", "support_aug"),
    ("aug.hue=-0.1", "aug.hue"), ("aug.color_jitter=-1", "aug.color_jitter"), ("fewshot.solver=cuda", "fewshot.solver"),
    ("analysis.sweeps={loss.lamda: [1]}", "loss.lamda"), ("analysis.methods=[ce, ce]", "twice"),
])
def test_config_values_are_read_as_written_or_refused(override, message):
    if message is None:
        cfg = load_config(None, [override])
        key, _, raw = override.partition("=")
        assert getattr(cfg, key) == raw  # a string field keeps its text: not 8, not 2024.1
    else:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            load_run_config(None, [override])  # the workflows' loading: dataset options checked too


def test_dataset_options_are_checked_by_the_catalog_validation_is_handed():
    cfg = load_config(None, ["data.options.foo=1"])  # schane.config alone knows no dataset
    with pytest.raises(ValueError, match=r"data\.options\.foo: is not an option of dataset"):
        check_config(cfg)
    with pytest.raises(ValueError, match=r"data\.name: unknown dataset"):
        load_run_config(None, ["data.name=nope"])


def test_config_is_the_bottom_floor_it_imports_only_the_losses():
    mods = [m for m in _imports(SRC / "config.py") if m.startswith("schane")]
    assert mods and all(m.startswith("schane.losses") for m in mods), mods


def test_no_workflow_imports_another_workflows_private_names():
    private = []
    for f in _files("pipelines", "cli.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("schane"):
                private += [f"{f.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_training_seeds_share_the_validation_hold_out(image_root, tmp_path):
    from schane.pipelines.splits import load_split

    a = load_config(None, ["data.name=image_folder", f"data.root={image_root}", "train.seed=1"])
    b = load_config(None, ["data.name=image_folder", f"data.root={image_root}", "train.seed=2"])
    c = load_config(None, ["data.name=image_folder", f"data.root={image_root}", "data.split_seed=5"])
    va, vb, vc = (load_split(x, "val").samples for x in (a, b, c))
    assert va == vb and va != vc


def test_old_checkpoints_keep_their_training_seed_hold_out(image_root, tmp_path):
    from schane.engine.checkpoint import load_checkpoint_model

    res = train(tiny_cfg(image_root, tmp_path, "old", "train.seed=3"))
    state = load_checkpoint(res.last_checkpoint)
    del state["config"]["data"]["split_seed"]  # a checkpoint written by schane < 0.2
    torch.save(state, tmp_path / "old.pt")
    _, cfg, _ = load_checkpoint_model(tmp_path / "old.pt")
    assert cfg.data.split_seed == 3


def test_channels_last_is_auto_or_a_boolean():
    from schane.engine.device import resolve_channels_last
    from schane.models import build_model

    assert load_config(None, []).train.channels_last == "auto"
    assert load_config(None, ["train.channels_last=true"]).train.channels_last is True
    assert load_config(None, ["train.channels_last=false"]).train.channels_last is False
    with pytest.raises(ValueError, match="train.channels_last"):
        load_config(None, ["train.channels_last=sometimes"])
    cfg = load_config(None, ["model.pretrained=false"])
    conv = build_model(cfg.model, 3)
    vit = build_model(load_config(None, ["model.backbone=test_vit", "model.pretrained=false"]).model, 3)
    assert resolve_channels_last("auto", conv) and not resolve_channels_last("auto", vit)
    assert resolve_channels_last(True, vit) and not resolve_channels_last(False, conv)


def test_function_local_imports_of_schane_say_why():
    """At a file's top, unless the import is lazy on purpose (start-up time, an import cycle), said in a comment."""
    silent = []
    for f in SRC.rglob("*.py"):
        lines = f.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("schane") and inner.level == 0:
                    if not any("#" in line for line in lines[inner.lineno - 1:inner.end_lineno]):
                        silent.append(f"{f.relative_to(SRC)}:{inner.lineno}")
    assert silent == []
