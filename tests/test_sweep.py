"""``schane sweep``: grid parsing, a 2x2x2 grid through local processes and through submitit's local executor,
an interrupted sweep submitted again, a failing run that does not sink the others."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch
import yaml

from schane.config import load_config, to_dict
from schane.pipelines.sweep import ExecutorOptions, parse_grid, parse_scalar, plan_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def fewshot_yaml(tmp, cache):
    """A few-shot config whose runs train in about a second (tiny timm backbone, 6/5/5 glyph classes)."""
    return _write(tmp / "fs.yaml", {
        "name": "fs", "output_dir": str(tmp / "runs"),
        "model": {"backbone": "test_efficientnet", "pretrained": False, "proj_dim": 16},
        "data": {"name": "glyphs", "img_size": 32, "batch_size": 8, "eval_batch_size": 64, "val_fraction": 0.2,
                 "options": {"cache_dir": str(cache), "n_train_classes": 6, "n_val_classes": 5, "n_test_classes": 5,
                             "samples_per_class": 6, "progress": False}},
        "optim": {"epochs": 1, "warmup_epochs": 0, "base_batch_size": None, "lr": 1e-3, "layer_decay": None},
        "train": {"device": "cpu", "amp": "none", "max_steps_per_epoch": 2, "progress": False, "report": False},
        "fewshot": {"ways": 3, "shots": [1, 2], "queries": 3, "episodes": 6, "val_episodes": 3, "support_aug": 1,
                    "n_jobs": 1},
    })


def classification_yaml(tmp, root, **train):
    return _write(tmp / "cls.yaml", {
        "name": "cls", "output_dir": str(tmp / "runs"),
        "model": {"backbone": "test_convnext", "pretrained": False},
        "data": {"name": "image_folder", "root": str(root), "img_size": 32, "batch_size": 4, "eval_batch_size": 16},
        "optim": {"epochs": 1, "warmup_epochs": 0.5, "lr": 1e-3, "base_batch_size": None, "layer_decay": None},
        "train": {"device": "cpu", "max_steps_per_epoch": 2, "progress": False, "report": False, **train},
    })


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --------------------------------------------------------------------------- parsing


def test_grid_values_are_yaml_scalars_and_linked_keys_change_together():
    ax = parse_grid("data.batch_size=16,32")
    assert ax.keys == ("data.batch_size",) and ax.values == [(16,), (32,)]
    assert [parse_scalar(t) for t in ("1e-3", "7.5e-4", "true", "null", "adamw", "0.5")] == [
        1e-3, 7.5e-4, True, None, "adamw", 0.5]
    linked = parse_grid("data.batch_size,optim.lr=16,7.5e-4;32,1.5e-3")
    assert linked.keys == ("data.batch_size", "optim.lr") and linked.values == [(16, 7.5e-4), (32, 1.5e-3)]
    assert linked.texts == [("16", "7.5e-4"), ("32", "1.5e-3")]


@pytest.mark.parametrize("bad, match", [
    ("data.batch_size", "expected KEY=V1,V2"),
    ("=1,2", "empty or malformed key"),
    ("data.batch_size=16,,32", "empty value"),
    ("data.batch_size=16,16", "appears twice"),
    ("data.batch_size,optim.lr=16;32,1e-3", "2 comma-separated values"),
    ("data.batch_size=[16,32]", "not a scalar"),
])
def test_grid_errors_are_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_grid(bad)
    assert "\n" not in str(e.value)


def test_plan_rejects_unknown_keys_reserved_keys_and_keys_a_method_sets(image_root, tmp_path):
    base = load_config(classification_yaml(tmp_path, image_root))
    with pytest.raises(ValueError, match="optim.nope"):
        plan_sweep(base, ["optim.nope=1,2"], ["ce"], [0])
    with pytest.raises(ValueError, match="set by the sweep"):
        plan_sweep(base, ["train.seed=1,2"], ["ce"], [0])
    with pytest.raises(ValueError, match="also set by method 'schane_beta0'"):
        plan_sweep(base, ["loss.beta=0.5,1.0"], ["ce", "schane_beta0"], [0])
    with pytest.raises(ValueError, match="two --grid"):
        plan_sweep(base, ["optim.lr=1e-3,2e-3", "optim.lr,data.batch_size=1e-3,4"], ["ce"], [0])


def test_cli_bad_grid_is_one_line_and_exit_2(image_root, tmp_path, capsys):
    from schane.cli import main

    cfg = classification_yaml(tmp_path, image_root)
    assert main(["sweep", "--config", str(cfg), "--grid", "data.batch_size", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("schane sweep: error: --grid 'data.batch_size': expected KEY=V1,V2")
    assert main(["sweep", "--config", str(cfg), "--grid", "optim.lr=x,y", "--out", str(tmp_path / "s")]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing started


def test_missing_submitit_is_one_line_naming_pip(image_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError, match=r"pip install 'schane\[sweep\]'"):
        run_sweep(load_config(classification_yaml(tmp_path, image_root)), ["optim.lr=1e-3,2e-3"], ["ce"], [0],
                  tmp_path / "s", options=ExecutorOptions(executor="slurm"))


# --------------------------------------------------------------------------- a 2x2x2 grid, local processes


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, glyph_cache):
    from schane.cli import main

    tmp = tmp_path_factory.mktemp("sweep")
    path, out = fewshot_yaml(tmp, glyph_cache), tmp / "out"
    rc = main(["sweep", "--config", str(path), "--grid", "data.batch_size=4,8", "--methods", "ce,schane",
               "--seeds", "0,1", "--out", str(out), "--jobs", "2"])
    return path, out, rc, json.loads((out / "sweep.json").read_text())


def test_local_grid_trains_each_run_as_schane_fewshot_would(local_sweep):
    from schane.pipelines.fewshot import run_config

    path, out, rc, res = local_sweep
    assert rc == 0 and res["failed"] == [] and res["evaluation"] == "fewshot"
    assert [c["name"] for c in res["cells"]] == ["batch_size=4", "batch_size=8"]
    for cell, bs in zip(res["cells"], (4, 8), strict=True):
        assert cell["settings"] == {"data.batch_size": bs}
        assert sorted((r["method"], r["seed"], r["status"]) for r in cell["runs"]) == [
            ("ce", 0, "finished"), ("ce", 1, "finished"), ("schane", 0, "finished"), ("schane", 1, "finished")]
        # the run directory and config schane fewshot would use for this cell
        cfg = load_config(path, [f"data.batch_size={bs}", f"name={cell['name']}", f"output_dir={out}",
                                 "fewshot.losses=[ce, schane]", "fewshot.seeds=[0, 1]"])
        for r in cell["runs"]:
            want = run_config(cfg, r["method"], r["seed"])
            assert r["run_dir"] == str(want.run_dir)
            assert yaml.safe_load((want.run_dir / "config.yaml").read_text()) == yaml.safe_load(
                yaml.safe_dump(to_dict(want)))
            assert r["log"] == str(out / "logs" / f"{cell['name']}__{r['method']}-seed{r['seed']}.log")
            assert "training " in open(r["log"]).read()
            start = json.loads(open(want.run_dir / "metrics.jsonl").readline())
            assert start["effective_batch"] == bs
        # the few-shot summary is schane fewshot's, over identical episodes, with base val top-1 beside it
        fs = json.loads((out / cell["name"] / "fewshot.json").read_text())
        assert set(cell["metrics"]) == {"3-way 1-shot", "3-way 2-shot", "base val top-1"}
        for shot in (1, 2):
            m = cell["metrics"][f"3-way {shot}-shot"]
            assert [x["method"] for x in m["rows"]] == ["ce", "schane"] and m["rows"][0]["n"] == 2
            d = next(x for x in fs["seed_differences"] if x["shot"] == shot and x["baseline"] == "ce")
            assert m["differences"] == [d] and d["method"] == "schane"
            assert m["pretrained"] == next(r["test"][str(shot)]["mean"] for r in fs["rows"] if r["method"] == "pretrained")
        assert [x["method"] for x in cell["metrics"]["base val top-1"]["rows"]] == ["ce", "schane"]
        assert {(d["method"], d["baseline"], d["seed"]) for d in cell["fewshot"]["differences"]} == {
            ("schane", "ce", 0), ("schane", "ce", 1)}
    report = (out / "report.md").read_text()
    assert "## `data.batch_size` = 4" in report and "## `data.batch_size` = 8" in report
    assert "| SCHaNe + CE − CE |" in report and "base val top-1" in report
    assert (out / "sweep_data.batch_size.png").stat().st_size > 5000


# --------------------------------------------------------------------------- submitit's local executor


def test_submitit_local_executor_runs_the_grid_as_an_array(image_root, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "out"
    res = run_sweep(load_config(classification_yaml(tmp_path, image_root)), ["optim.lr=1e-3,3e-3"], ["ce", "schane"],
                    [0, 1], out, options=ExecutorOptions(executor="submitit-local", jobs=8))
    assert res["failed"] == [] and res["evaluation"] == "classification" and res["executor"] == "submitit-local"
    assert [c["name"] for c in res["cells"]] == ["lr=1e-3", "lr=3e-3"]
    for cell in res["cells"]:
        assert all(r["status"] == "finished" for r in cell["runs"]) and len(cell["runs"]) == 4
        test = cell["metrics"]["test top-1"]
        finals = {(r["method"], r["seed"]): json.loads(open(os.path.join(r["run_dir"], "final.json")).read())
                  for r in cell["runs"]}
        for row in test["rows"]:  # each run's test top-1 of its selected weights, across seeds
            assert row["values"] == pytest.approx([100 * finals[(row["method"], s)]["test"]["top1"] for s in (0, 1)])
        d = test["differences"][0]
        assert (d["method"], d["baseline"]) == ("schane", "ce")
        assert d["values"] == pytest.approx([a - b for a, b in zip(test["rows"][1]["values"], test["rows"][0]["values"],
                                                                   strict=True)])
        for r in cell["runs"]:
            assert "[sweep] " + f"{cell['name']}/{r['method']}-seed{r['seed']}" in open(r["log"]).read()
    assert (out / "submitit").is_dir() and (out / "sweep_optim.lr.png").is_file()


# --------------------------------------------------------------------------- resume and failures


def test_interrupted_sweep_submitted_again_finishes_without_redoing_finished_runs(image_root, tmp_path, monkeypatch):
    import schane.pipelines.sweep_executors as executors
    import schane.pipelines.train as pt

    base = load_config(classification_yaml(tmp_path, image_root))
    out, grid = tmp_path / "out", ["optim.lr=1e-3,3e-3"]
    plain = pt.train

    def stop_second_run(cfg, resume=None):
        def cb(info):
            if info["global_step"] == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # the cluster's signal: a checkpoint at this step boundary
        return plain(cfg, resume, callback=cb if cfg.name == "ce-seed1" and "lr=1e-3" in str(cfg.run_dir) else None)

    monkeypatch.setattr(executors, "train", stop_second_run)  # the in-process executor's training
    first = run_sweep(base, grid, ["ce"], [0, 1], out, options=ExecutorOptions(jobs=1))
    status = {(r["cell"], r["seed"]): r["status"] for r in first["cells"][0]["runs"] + first["cells"][1]["runs"]}
    assert status == {("lr=1e-3", 0): "finished", ("lr=1e-3", 1): "stopped", ("lr=3e-3", 0): "stopped",
                      ("lr=3e-3", 1): "stopped"}
    assert len(first["failed"]) == 3 and "not evaluated" not in json.dumps(first["cells"][0])
    stopped = out / "lr=1e-3" / "ce-seed1"
    assert torch.load(stopped / "last.pt", weights_only=True)["global_step"] == 1  # mid-epoch
    done = out / "lr=1e-3" / "ce-seed0" / "last.pt"
    mtime = done.stat().st_mtime_ns

    monkeypatch.setattr(executors, "train", plain)
    again = run_sweep(base, grid, ["ce"], [0, 1], out, options=ExecutorOptions(jobs=1))
    status = {(r["cell"], r["seed"]): r["status"] for c in again["cells"] for r in c["runs"]}
    assert status == {("lr=1e-3", 0): "reused", ("lr=1e-3", 1): "finished", ("lr=3e-3", 0): "finished",
                      ("lr=3e-3", 1): "finished"}
    assert again["failed"] == [] and done.stat().st_mtime_ns == mtime  # the finished run was not touched
    assert "resumed from" in (out / "logs" / "lr=1e-3__ce-seed1.log").read_text()
    # the resumed run ends with the weights of an uninterrupted one
    ref = plain(plan_sweep(base, grid, ["ce"], [1], tmp_path / "ref").runs[0].cfg)
    a, b = _weights(ref.last_checkpoint), _weights(stopped / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a changed config is refused before anything starts, naming the run directory
    with pytest.raises(ValueError, match=r"another config, e\.g\. .*ce-seed0 \(optim.epochs: 1 -> 2"):
        plan_sweep(load_config(classification_yaml(tmp_path, image_root), ["optim.epochs=2"]), grid, ["ce"], [0, 1],
                   out)


def test_a_failing_run_is_listed_with_its_log_and_the_others_finish(image_root, tmp_path, capsys):
    from schane.cli import main

    cfg, out = classification_yaml(tmp_path, image_root), tmp_path / "out"
    # batch 64 is larger than the training split: that run fails when it starts, the batch-4 run finishes
    rc = main(["sweep", "--config", str(cfg), "--grid", "data.batch_size=4,64", "--methods", "ce", "--seeds", "0",
               "--out", str(out), "--jobs", "2"])
    assert rc == 1
    stdout = capsys.readouterr().out
    res = json.loads((out / "sweep.json").read_text())
    (failed,) = res["failed"]
    log = out / "logs" / "batch_size=64__ce-seed0.log"
    assert failed["cell"] == "batch_size=64" and failed["status"] == "failed" and failed["log"] == str(log)
    assert "ValueError" in failed["error"] and "Traceback" in log.read_text()
    assert f"(log: {log})" in stdout and "did not finish" in stdout
    ok, bad = res["cells"]
    assert ok["metrics"]["test top-1"]["rows"][0]["n"] == 1 and bad["metrics"] == {} and "not evaluated" in bad["note"]
    assert "Runs that did not finish" in (out / "report.md").read_text()


def test_slurm_options_reach_the_array_job_script(image_root, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from schane.pipelines.sweep_executors import SubmititJob, check_options, submitit_executor

    bin_dir = tmp_path / "bin"  # stand-ins for Slurm's commands: srun exists, sbatch answers with a job id
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = plan_sweep(load_config(classification_yaml(tmp_path, image_root)), ["optim.lr=1e-3,3e-3"], ["ce", "schane"],
                       [0, 1], tmp_path / "out")
    opts = ExecutorOptions(executor="slurm", jobs=3, partition="gpu", gpus_per_node=1, cpus_per_task=4, time_min=90)
    check_options(opts, sweep)
    jobs = submitit_executor(tmp_path / "out", opts, 3).map_array(SubmititJob(), [{"run": i} for i in range(4)])
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2", "4242_3"]
    script = jobs[0].paths.submission_file.read_text()
    for line in ("--array=0-3%3", "--partition=gpu", "--signal=USR1@120", "--time=90", "--cpus-per-task=4",
                 "--gpus-per-node=1"):
        assert f"#SBATCH {line}" in script, line
    with pytest.raises(ValueError, match="train.stop_signals"):
        check_options(ExecutorOptions(executor="slurm", signal="SIGUSR2"), sweep)


def test_a_stopped_submitit_job_requeues_itself_and_resumes_its_run(image_root, tmp_path):
    submitit = pytest.importorskip("submitit")
    import re
    import time

    from schane.pipelines.sweep_executors import SubmititJob, job_spec

    cfg = load_config(classification_yaml(tmp_path, image_root),  # 48 steps: the signal comes at the first
                      ["optim.epochs=8", "train.max_steps_per_epoch=null", "train.log_every_steps=1"])
    run = plan_sweep(cfg, [], ["ce"], [0], tmp_path / "out").runs[0]
    run.log.parent.mkdir(parents=True)
    executor = submitit.AutoExecutor(folder=tmp_path / "out" / "submitit", cluster="local")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(SubmititJob(requeue=True), job_spec(run, 1))  # requeue as on Slurm
    metrics, t0 = run.run_dir / "metrics.jsonl", time.monotonic()
    while not (metrics.is_file() and '"train_step"' in metrics.read_text()) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    os.kill(int(re.search(r"pid (\d+)", run.log.read_text()).group(1)), signal.SIGUSR1)  # Slurm's time-limit signal
    assert job.result()["status"] == "finished"
    log = run.log.read_text()
    assert "SIGUSR1: stopped at epoch" in log and "resumed from" in log  # stopped, requeued, resumed
    assert len(set(re.findall(r"pid (\d+)", log))) == 2
    assert json.loads((run.run_dir / "final.json").read_text())["global_step"] == 8 * 6
