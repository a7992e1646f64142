"""How the ``schane train --data`` recipe was chosen: the recipe against hand-set variants on three sets.

Builds three small image sets from offline sources (cached under ``--cache``):

* ``fmnist``: 10 classes x 200 Fashion-MNIST training images (28 px grayscale), one folder per class
  (needs Debian's ``dataset-fashion-mnist``);
* ``glyphs``: 40 glyph classes x 20 images (32 px), one folder per class;
* ``digits``: scikit-learn's 1,797 handwritten digits (8 px), listed in a ``train.csv``;

and ``fmnist_check``: 10 x 200 images of Fashion-MNIST's *test* file, never used to choose anything (the
acceptance check of ``schane train --data`` on a folder it was not tuned on); ``glyphs100`` (100 glyph classes
x 20 images) shows the run report at 100 classes.

For every selection set it trains the recipe (``schane train --data DIR``, nothing set) and variants that
change one setting (learning rate, image size, epochs), each through the CLI, and prints a table of the
validation top-1 of the selected checkpoint (the rule is chosen on these), the test top-1 (reported, never
used to choose) and the wall time. Results go to ``--out`` as JSON.

    python benchmarks/own_data_rules.py --sets fmnist glyphs digits
    python benchmarks/own_data_rules.py --sets fmnist_check --variants recipe lr=1e-3 lr=1e-2
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
VARIANTS = {
    "recipe": [],
    "lr=1e-3": ["optim.lr=1e-3"],
    "lr=1e-2": ["optim.lr=1e-2"],
    "size x2": ["data.img_size=64"],
    "epochs x2": ["optim.epochs=@2"],
    "ce": ["loss.name=ce"],
}


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fmnist(out: Path, part: str, per_class: int = 200) -> None:
    x, y = _idx(FMNIST / f"{part}-images-idx3-ubyte.gz"), _idx(FMNIST / f"{part}-labels-idx1-ubyte.gz")
    names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(np.flatnonzero(y == c))[:per_class]:
            Image.fromarray(x[i]).save(out / name / f"{i:05d}.png")


def _glyphs(out: Path, classes: int = 40) -> None:
    from schane.data import get_dataset

    ds = get_dataset("glyphs", None, "train", val_fraction=0.0, n_train_classes=classes, progress=False)
    for k, (img, label) in enumerate(ds):
        d = out / f"c{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        img.convert("L").save(d / f"{k:05d}.png")


def _digits(out: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    (out / "img").mkdir(parents=True, exist_ok=True)
    with open(out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
            Image.fromarray((img * 16).clip(0, 255).astype(np.uint8)).save(out / "img" / f"{i:04d}.png")
            w.writerow([f"img/{i:04d}.png", str(label)])


def build(name: str, cache: Path) -> Path:
    out = cache / name
    if (out / ".done").exists():
        return out
    {"fmnist": lambda: _fmnist(out, "train"), "fmnist_check": lambda: _fmnist(out, "t10k"),
     "glyphs": lambda: _glyphs(out), "glyphs100": lambda: _glyphs(out, 100), "digits": lambda: _digits(out)}[name]()
    (out / ".done").touch()
    return out


def run(data: Path, variant: str, runs: Path) -> dict:
    extra = list(VARIANTS[variant])
    name = f"{data.name}-{variant.replace('=', '').replace(' ', '')}"
    if any(e.endswith("=@2") for e in extra):
        from schane.pipelines.own_data import config_for_data

        cfg, _ = config_for_data(data, write_splits=False)
        extra = [f"optim.epochs={2 * cfg.optim.epochs}"]
    cmd = [sys.executable, "-m", "schane", "train", "--data", str(data), "--set", f"output_dir={runs}",
           f"name={name}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"set": data.name, "variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    final = json.loads((runs / name / "final.json").read_text())
    plan = [ln for ln in proc.stderr.splitlines() if "plan:" in ln]
    return {"set": data.name, "variant": variant, "val_top1": final["best_val_top1"],
            "best_epoch": final["best_epoch"], "epochs": final["epochs"], "test_top1": final["test"]["top1"],
            "test_n": final["test"]["n"], "seconds": wall, "plan": plan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["fmnist", "glyphs", "digits"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cache", default=".cache/own_data_sets")
    ap.add_argument("--out", default=".cache/own_data_rules.json")
    args = ap.parse_args()
    cache = Path(args.cache)
    rows = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    done = {(r["set"], r["variant"]) for r in rows if "error" not in r}
    for s in args.sets:
        data = build(s, cache)
        for v in args.variants:
            if (s, v) in done:
                continue
            r = run(data, v, cache / "runs")
            rows = [x for x in rows if (x["set"], x["variant"]) != (s, v)] + [r]
            Path(args.out).write_text(json.dumps(rows, indent=2))
            print(json.dumps({k: r.get(k) for k in ("set", "variant", "val_top1", "best_epoch", "test_top1",
                                                    "seconds", "error")}), flush=True)
    print("\n| set | variant | val top-1 (%) | best epoch | test top-1 (%) | wall (s) |")
    print("|:--|:--|--:|--:|--:|--:|")
    for r in sorted(rows, key=lambda r: (r["set"], r["variant"] != "recipe", r["variant"])):
        if "error" in r:
            print(f"| {r['set']} | {r['variant']} | error: {r['error']} | | | |")
            continue
        print(f"| {r['set']} | {r['variant']} | {100 * r['val_top1']:.2f} | {r['best_epoch'] + 1}/{r['epochs']} "
              f"| {100 * r['test_top1']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
