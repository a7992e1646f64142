"""benchmarks/gpu_check.py --tiny: the GPU check's code paths run on the CPU at toy sizes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("SCHANE_LOSS_BACKEND", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )


def test_gpu_check_tiny_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--tiny", "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tiny"] and res["ok"] and res["errors"] == {}
    # correctness: every loss x precision x path, all within tolerance, gradients compared to float64
    rows = res["correctness"]
    assert {r["loss"] for r in rows} == {
        "schane",
        "schane each b=2",
        "schane detached w",
        "supcon",
        "simclr",
        "hcl",
    }
    assert {(r["precision"], r["path"]) for r in rows} == {
        (p, q) for p in ("fp32", "bf16", "fp16") for q in ("plain", "chunk_size", "queue (ref)")
    }
    assert all(r["ok"] for r in rows)
    assert {r["emb_dtype"] for r in rows if r["precision"] == "bf16"} == {"torch.bfloat16"}
    # loss speed: floor, SCHaNe and PML at each size, the largest one chunked
    speed = res["loss_speed"]
    assert {r["n"] for r in speed} == {64, 256, 512}
    methods = {r["method"] for r in speed}
    assert "matmul floor" in methods and "PML SupConLoss" in methods
    assert "SCHaNeLoss chunk_size=64 (eager)" in methods
    assert all(r["time_s"] > 0 and r["vs_floor"] > 0 for r in speed if "time_s" in r)
    step = res["train_step"]
    assert step["backbone"] == "vit_tiny_patch16_224" and set(step["step_s"]) == {"CE", "SCHaNe + CE"}
    assert res["beit3"]["backbone"] == "beit3_tiny" and res["beit3"]["images_per_s"] > 0
    assert res["features"]["images_per_s"] > 0
    full = res["full_size"]  # benchmarks/full_size.py's measurement, checkpointing off and on
    assert [(r["backbone"], r["checkpointing"]) for r in full] == [
        (b, c) for b in ("beit3_tiny", "vit_tiny_patch16_224") for c in (False, True)]
    # toy sizes: memory differences are at the resident set's noise level, only the fields are checked
    assert all(r["s_per_image"] > 0 and {"after_forward_mb", "fwd_bwd_peak_mb"} <= set(r["steps"][1]) for r in full)
    md = proc.stdout
    for heading in ("# schane GPU check", "## Correctness", "## Loss speed", "### Training step", "images/s",
                    "### Full-size training step"):
        assert heading in md
    assert "Result: **OK**" in md


def test_gpu_check_reports_a_failing_section(tmp_path, monkeypatch):
    """A section that raises is reported (and sets the exit status) instead of hiding the other sections."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def boom(sizes, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_check.SECTIONS, "beit3", boom)
    res = gpu_check.run(tiny=True, sections=["beit3", "features"])
    assert not res["ok"] and "illegal memory access" in res["errors"]["beit3"]
    assert res["features"]["images_per_s"] > 0
    md = gpu_check.markdown(res)
    assert "beit3 raised" in md and "FAILED" in md


def test_gpu_check_without_cuda_says_how_to_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run the full check")
    proc = _run(tmp_path=tmp_path)
    assert proc.returncode == 2 and "--tiny" in proc.stderr
