"""How the demo's settings were chosen: base-class validation top-1 and validation-class few-shot accuracy.

Each candidate is the shipped demo config (``src/schane/configs/demo.yaml``) with some overrides: a cell of a
sweep (:mod:`schane.pipelines.sweep`) whose one method is the candidate's ``loss.name`` (default: the demo
config's). Every candidate is trained once (seed 0 unless ``--seed``; ``--jobs N`` trains N at once), then
scored exactly as the demo selects (:func:`schane.pipelines.sweep_report.validation_scores`): the checkpoint
(best.pt or last.pt) and the logistic-regression C are chosen on ``val_classes`` episodes, whose accuracy is the
score. The novel (``test_classes``) images are never loaded. With ``--pretrained`` the pretrained backbone is
scored on the same validation episodes for reference. Wall time per run is printed too, to check the demo's
budget. The sweep's ``sweep.json`` and ``report.md`` are written to ``--out``.

Usage:
    python benchmarks/select_demo_settings.py --out runs/select \\
        --candidate ce-lr3e-3 loss.name=ce optim.lr=3e-3 \\
        --candidate schane-lam0.5 loss.name=schane loss.lam=0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from schane.pipelines.demo import demo_config
from schane.pipelines.sweep import CellSpec, ExecutorOptions, run_sweep
from schane.progress import setup_logging


def candidate_cell(name: str, overrides: Sequence[str], default_loss: str) -> CellSpec:
    """A candidate as a sweep cell: its ``loss.name`` becomes the cell's one method, the rest its overrides."""
    loss = default_loss
    rest = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.strip() == "loss.name":
            loss = value.strip()
        else:
            rest.append(ov)
    return CellSpec(name, rest, methods=[loss])


def table(results: dict[str, Any], overrides: dict[str, list[str]]) -> list[str]:
    """The markdown table of a selection sweep: one row per candidate (and the pretrained backbone)."""
    ways = results["base_config"]["fewshot"]["ways"]
    shots = results["base_config"]["fewshot"]["shots"]
    lines = ["| candidate | overrides | base val top-1 last / best (%) | "
             + " | ".join(f"val-class {s}-shot (%)" for s in shots) + " | train (s) |",
             "|---" * (len(shots) + 4) + "|"]
    pretrained = None
    for cell in results["cells"]:
        if not cell["metrics"]:
            lines.append(f"| {cell['name']} | {' '.join(overrides[cell['name']])} | failed: see "
                         f"{cell['runs'][0]['log']} |" + " |" * (len(shots) + 1))
            continue
        run = cell["runs"][0]
        final = json.loads((Path(run["run_dir"]) / "final.json").read_text())
        best = final.get("best_val_top1")
        base = cell["metrics"]["base val top-1"]["rows"][0]["mean"]
        accs = []
        for s in shots:
            m = cell["metrics"][f"val-class {ways}-way {s}-shot"]
            accs.append(f"{m['rows'][0]['mean']:.2f}")
            if m.get("pretrained") is not None:
                pretrained = pretrained or {}
                pretrained[s] = m["pretrained"]
        secs = f"{run['seconds']:.0f}" if run.get("seconds") is not None else "—"
        best_text = "—" if best is None else f"{100 * best:.1f}"
        lines.append(f"| {cell['name']} | {' '.join(overrides[cell['name']])} | {base:.1f} / {best_text} | "
                     + " | ".join(accs) + f" | {secs} |")
    if pretrained:
        lines.append("| pretrained | — | — | " + " | ".join(f"{pretrained[s]:.2f}" for s in shots) + " | — |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/select")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidate", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="a candidate: its name, then config overrides")
    p.add_argument("--pretrained", action="store_true", help="also score the pretrained backbone")
    p.add_argument("--jobs", type=int, default=1, help="candidates trained at once (default 1)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the demo config for every candidate, e.g. fewshot.val_episodes=100")
    args = p.parse_args()
    if not args.candidate:
        p.error("give at least one --candidate NAME KEY=VALUE ...")
    setup_logging()
    out = Path(args.out)
    cfg = demo_config(out, seeds=[args.seed], overrides=[*args.overrides,
                                                             f"fewshot.include_pretrained={str(args.pretrained).lower()}"])
    cells = [candidate_cell(name, ovs, cfg.loss.name) for name, *ovs in args.candidate]
    results = run_sweep(cfg, seeds=[args.seed], out=out, cells=cells, evaluation="validation",
                        options=ExecutorOptions(jobs=args.jobs), command=" ".join(sys.argv))
    print(f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n".join(table(results, {name: ovs for name, *ovs in args.candidate})))
    print(f"\nsweep: {results['files']['sweep']}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
