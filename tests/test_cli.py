"""``schane train`` / ``schane eval`` as a user runs them, including the errors for bad input."""

from __future__ import annotations

import json

import pytest

from schane.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def error_text(err):
    """The CLI's error report: from its ``schane CMD: error:`` line on (log lines may come before it)."""
    assert "Traceback" not in err
    return err[err.index("schane "):] if "schane " in err else err


def _config(tmp_path, root):
    p = tmp_path / "run.yaml"
    p.write_text(
        f"""name: cli
output_dir: {tmp_path / 'runs'}
model: {{backbone: test_convnext, pretrained: false}}
data: {{name: image_folder, root: {root}, img_size: 32, batch_size: 4}}
optim: {{epochs: 1, warmup_epochs: 0, base_batch_size: null, layer_decay: null}}
train: {{max_steps_per_epoch: 2, progress: false}}
"""
    )
    return p


def test_train_then_eval(image_root, tmp_path, capsys):
    cfg = _config(tmp_path, image_root)
    assert main(["train", "--config", str(cfg), "--set", "loss.name=supcon", "loss.lam=0.5"]) == 0
    run = tmp_path / "runs" / "cli"
    assert "loss:\n  name: supcon\n  lam: 0.5" in (run / "config.yaml").read_text()
    assert "test top-1" in capsys.readouterr().out
    out_json = tmp_path / "m.json"
    rc = main(["eval", "--checkpoint", str(run / "best.pt"), "--split", "val", "--data", str(image_root),
               "--json", str(out_json)])
    assert rc == 0
    table = capsys.readouterr().out
    got = json.loads(out_json.read_text())
    assert got["split"] == "val" and f"{100 * got['top1']:.2f}%" in table
    # running the same config again refuses to overwrite the run; --resume auto finishes at once
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "loss.name=supcon", "loss.lam=0.5", "--resume", "auto"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "optim.lrr=1"], "optim.lrr"),
        (["--set", "loss.name=triplet"], "loss.name"),
        (["--set", "train.amp=fp16", "train.device=cpu"], "fp16"),
        (["--set", "data.root=/nonexistent/dir"], "/nonexistent/dir"),
        (["--set", "data.batch_size=500"], "data.batch_size"),
        (["--resume", "/nonexistent/last.pt"], "no such checkpoint"),
    ],
)
def test_train_errors_are_clear(image_root, tmp_path, capsys, argv, message):
    assert main(["train", "--config", str(_config(tmp_path, image_root)), *argv]) == 2
    err = error_text(capsys.readouterr().err)
    assert err.startswith("schane train: error:") and message in err


def test_eval_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
