"""``schane sweep``: a grid of settings x methods x training seeds, each run one job, compared per cell.

A sweep crosses the values of one or more grid keys (``--grid data.batch_size=16,32``; linked keys change
together: ``--grid 'data.batch_size,optim.lr=16,7.5e-4;32,1.5e-3'``). Each combination is a *cell*; in each
cell every method is fine-tuned once per seed. A cell is exactly what ``schane fewshot`` would run on its
config: its directory is ``OUT/<cell>`` (``OUT`` itself without a grid) and its runs
``OUT/<cell>/<method>-seed<seed>`` are built by :func:`schane.pipelines.fewshot.run_config`, so run
directories and configs are the ones ``schane fewshot`` and ``schane demo`` train.

Each run is one job (:mod:`schane.pipelines.sweep_executors`: parallel local processes, or a Slurm array
through submitit). Finished runs (``final.json`` present, same config) are skipped; unfinished ones resume from
their ``last.pt``. Then every cell is evaluated (:mod:`schane.pipelines.sweep_report`): on a few-shot set with
``schane fewshot``'s protocol on identical episodes (paired differences), on a classification set with each
run's test top-1, or, with ``validation_only``, on validation-class episodes alone (to choose settings).
Results go to ``OUT/sweep.json``, ``OUT/report.md`` and ``OUT/sweep_<key>.png``. See docs/sweeps.md.

Examples:
    >>> from schane.config import load_config
    >>> cfg = load_config("configs/demo.yaml")  # doctest: +SKIP
    >>> result = run_sweep(cfg, grid=["data.batch_size=32,64"], methods=["ce", "schane"], seeds=[0, 1],
    ...                    out="runs/bs")  # doctest: +SKIP
    >>> result["failed"]  # doctest: +SKIP
    []
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schane.config import Config, apply_overrides, from_dict, parse_method, to_dict
from schane.data import dataset_info
from schane.pipelines.fewshot import run_config
from schane.pipelines.runs import check_config
from schane.pipelines.scoring import TEST_SPLIT, VAL_SPLIT
from schane.progress import format_duration

logger = logging.getLogger(__name__)

EVALUATIONS = ("auto", "fewshot", "classification", "validation")
RESERVED_KEYS = ("name", "output_dir", "fewshot.losses", "fewshot.seeds", "train.seed")
# sections that do not change what a run trains: a finished run is reused whatever they hold
IGNORED_SECTIONS = ("fewshot", "analysis")
FINISHED = ("finished", "reused")


@dataclass
class GridAxis:
    """One ``--grid`` argument: one key, or several keys that change together.

    Attributes:
        keys: the dotted config keys, e.g. ``("data.batch_size",)`` or ``("data.batch_size", "optim.lr")``.
        values: per point, one value per key (parsed as YAML scalars).
        texts: the values as written (what the config parses and what cell names show).
    """

    keys: tuple[str, ...]
    values: list[tuple[Any, ...]]
    texts: list[tuple[str, ...]]


@dataclass
class CellSpec:
    """A cell given directly rather than by a grid: a name and its config overrides.

    Attributes:
        name: the cell's directory name under the sweep's output directory.
        overrides: ``key=value`` overrides applied to the base config.
        methods: the cell's own methods (``None``: the sweep's).
    """

    name: str
    overrides: list[str]
    methods: list[str] | None = None


@dataclass
class Run:
    """One training run of a sweep: a (cell, method, seed) and its config.

    ``status`` is ``pending``, ``reused`` (finished before the sweep started), ``finished``, ``stopped``
    (a stop signal ended it; it resumes when the sweep is submitted again) or ``failed``.
    """

    cell: str
    method: str
    seed: int
    cfg: Config
    log: Path
    status: str = "pending"
    error: str | None = None
    seconds: float | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def label(self) -> str:
        """``cell/method-seedN`` (``method-seedN`` without a grid)."""
        return f"{self.cell}/{self.run_dir.name}" if self.cell else self.run_dir.name

    def to_dict(self) -> dict[str, Any]:
        return {"cell": self.cell, "method": self.method, "seed": self.seed, "run_dir": str(self.run_dir),
                "status": self.status, "log": str(self.log), "error": self.error, "seconds": self.seconds}


@dataclass
class Cell:
    """One point of the grid: its settings, its config (the one ``schane fewshot`` would run) and methods."""

    name: str
    settings: dict[str, Any]
    texts: dict[str, str]
    cfg: Config
    methods: list[str]


@dataclass
class Sweep:
    """A planned sweep: cells, their runs, where results go and how cells are evaluated."""

    base: Config
    out: Path
    axes: list[GridAxis]
    cells: list[Cell]
    seeds: list[int]
    evaluation: str
    runs: list[Run] = field(default_factory=list)

    def cell_runs(self, cell: Cell) -> list[Run]:
        return [r for r in self.runs if r.cell == cell.name]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.status not in FINISHED]


# --------------------------------------------------------------------------- parsing


def parse_scalar(text: str) -> Any:
    """A grid value as a YAML scalar: ``16`` -> 16, ``7.5e-4`` and ``1e-3`` -> float, ``true`` -> True, ``abc`` -> 'abc'.

    Raises:
        ValueError: on an empty value or a list/mapping.
    """
    t = text.strip()
    if not t:
        raise ValueError("empty value")
    if t[0] in "[{" or t[-1] in "]}":
        raise ValueError(f"{t!r} is not a scalar (grid values are numbers, booleans or words; a list such as "
                         "fewshot.shots=[1,5] goes in --set)")
    try:
        v = yaml.safe_load(t)
    except yaml.YAMLError:
        return t
    if isinstance(v, (list, dict)):
        raise ValueError(f"{t!r} is not a scalar (grid values are numbers, booleans or words)")
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(v) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v) else v
        except ValueError:
            return v
    return v


def parse_grid(text: str) -> GridAxis:
    """Parse one ``--grid``: ``KEY=V1,V2,...`` or linked keys ``K1,K2=a1,a2;b1,b2`` (groups split by ``;``).

    Raises:
        ValueError: one line naming the argument and what is wrong.
    """
    where = f"--grid {text!r}"
    keys_text, eq, values_text = text.partition("=")
    if not eq:
        raise ValueError(f"{where}: expected KEY=V1,V2,... (e.g. data.batch_size=16,32) or linked keys "
                         "K1,K2=a1,a2;b1,b2")
    keys = tuple(k.strip() for k in keys_text.split(","))
    if any(not k or " " in k for k in keys):
        raise ValueError(f"{where}: empty or malformed key before '='")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}: a key appears twice")
    if len(keys) == 1:
        groups = [[v] for v in values_text.split(";" if ";" in values_text else ",")]
    else:
        groups = [g.split(",") for g in values_text.split(";")]
        for g in groups:
            if len(g) != len(keys):
                raise ValueError(f"{where}: each ';'-separated group needs {len(keys)} comma-separated values "
                                 f"({', '.join(keys)}); got {','.join(g)!r}")
    values, texts = [], []
    for g in groups:
        try:
            vals = tuple(parse_scalar(v) for v in g)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        texts.append(tuple(v.strip() for v in g))
        values.append(vals)
    if len(set(texts)) != len(texts):
        raise ValueError(f"{where}: a value appears twice")
    return GridAxis(keys, values, texts)


def parse_list(text: str, what: str) -> list[str]:
    """``ce,supcon,schane`` -> ``["ce", "supcon", "schane"]``.

    Raises:
        ValueError: on an empty item or a repeated one.
    """
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise ValueError(f"--{what} {text!r}: expected a comma-separated list, e.g. "
                         + ("ce,supcon,schane" if what == "methods" else "0,1,2"))
    if len(set(items)) != len(items):
        raise ValueError(f"--{what} {text!r}: an item appears twice")
    return items


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> ``[0, 1, 2]``.

    Raises:
        ValueError: on a non-integer.
    """
    out = []
    for x in parse_list(text, "seeds"):
        try:
            out.append(int(x))
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {x!r} is not an integer") from None
    return out


# --------------------------------------------------------------------------- planning


def _with(cfg: Config, overrides: Sequence[str]) -> Config:
    return from_dict(apply_overrides(to_dict(cfg), list(overrides)))


def _cell_name(keys: Sequence[str], texts: Sequence[str]) -> str:
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = [s if short.count(s) == 1 else k for s, k in zip(short, keys, strict=True)]
    raw = "_".join(f"{n}={t}" for n, t in zip(names, texts, strict=True))
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", raw)


def _check_axes(axes: Sequence[GridAxis], methods: Sequence[str]) -> None:
    seen: set[str] = set()
    for ax in axes:
        for k in ax.keys:
            if k in seen:
                raise ValueError(f"--grid: key {k!r} appears in two --grid arguments; link keys that change "
                                 "together in one: --grid 'K1,K2=a1,a2;b1,b2'")
            seen.add(k)
            if k in RESERVED_KEYS or k.startswith(("fewshot.losses.", "fewshot.seeds.")):
                raise ValueError(f"--grid: {k!r} is set by the sweep itself (--out, --methods, --seeds); "
                                 "grid another key")
    for m in methods:
        for ov in parse_method(m, "--methods")[1]:
            k = ov.partition("=")[0]
            if k in seen:
                raise ValueError(f"--grid: key {k!r} is also set by method {m!r}, which would override the grid "
                                 "value; grid another key or drop the method")


def evaluation_for(cfg: Config) -> str:
    """``fewshot`` when ``cfg.data`` has validation and test class splits, else ``classification``."""

    splits = dataset_info(cfg.data.name, options=cfg.data.options).splits
    return "fewshot" if VAL_SPLIT in splits and TEST_SPLIT in splits else "classification"


def plan_sweep(base: Config, grid: Sequence[str | GridAxis] = (), methods: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None, out: str | Path | None = None, *,
               cells: Sequence[CellSpec] | None = None, evaluation: str = "auto") -> Sweep:
    """Every cell's config and every run's, validated before anything starts; finished runs marked ``reused``.

    Args:
        base: the base config (file plus ``--set`` overrides).
        grid: ``--grid`` strings or parsed axes; their cross product gives the cells (none: one cell).
        methods: the methods of every cell (default ``base.fewshot.losses``): a loss name or a compared method
            (``schane_beta0``, ``LOSS@key=value``).
        seeds: training seeds (default ``base.fewshot.seeds``).
        out: the sweep's directory (default ``base.run_dir``). Cells go to ``out/<cell>``; without a grid the
            one cell is ``out`` itself (with ``out`` not given, the base config unchanged).
        cells: explicit cells instead of a grid (each with its overrides and optionally its own methods).
        evaluation: ``auto`` (``fewshot`` on a few-shot set, else ``classification``), ``fewshot``,
            ``classification`` or ``validation`` (validation-class episodes only).

    Raises:
        ValueError: on a malformed grid, an unknown key or value, a run directory holding a run of another
            config, or an unknown evaluation.
    """
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation {evaluation!r}: use one of {', '.join(EVALUATIONS)}")
    if grid and cells:
        raise ValueError("give either grid axes or explicit cells, not both")
    axes = [g if isinstance(g, GridAxis) else parse_grid(g) for g in grid]
    methods = list(methods if methods is not None else base.fewshot.losses)
    seeds = [int(s) for s in (seeds if seeds is not None else base.fewshot.seeds)]
    if not methods or not seeds:
        raise ValueError("a sweep needs at least one method and one seed")
    for m in methods:
        parse_method(m, "--methods")
    _check_axes(axes, methods)
    out_dir = Path(out) if out is not None else Path(base.run_dir)
    if evaluation == "auto":
        evaluation = evaluation_for(base)
    specs: list[tuple[str, dict[str, Any], dict[str, str], list[str], list[str] | None]] = []
    if cells:
        for c in cells:
            if not c.name or c.name != re.sub(r"[^A-Za-z0-9._=+-]", "_", c.name):
                raise ValueError(f"cell name {c.name!r}: use letters, digits and . _ = + -")
            specs.append((c.name, {}, {}, list(c.overrides), c.methods))
    elif axes:
        for point in itertools.product(*[list(zip(a.values, a.texts, strict=True)) for a in axes]):
            keys = [k for a in axes for k in a.keys]
            vals = [v for p in point for v in p[0]]
            written = [t for p in point for t in p[1]]
            specs.append((_cell_name(keys, written), dict(zip(keys, vals, strict=True)),
                          dict(zip(keys, written, strict=True)),
                          [f"{k}={t}" for k, t in zip(keys, written, strict=True)], None))
    else:
        specs.append(("", {}, {}, [], None))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two cells would share the directory {next(n for n in names if names.count(n) > 1)!r}")
    sweep = Sweep(base, out_dir, axes, [], seeds, evaluation)
    for name, settings, texts, overrides, own_methods in specs:
        loc = ([f"name={name}", f"output_dir={out_dir}"] if name else
               [] if out is None else [f"name={out_dir.name}", f"output_dir={out_dir.parent}"])
        try:
            cfg = _with(base, [*overrides, *loc])
        except ValueError as e:
            raise ValueError(f"cell {name or out_dir}: {e}") from None
        cell_methods = list(own_methods) if own_methods is not None else methods
        cfg.fewshot.losses, cfg.fewshot.seeds = cell_methods, seeds
        check_config(cfg)  # every cell in full, its dataset options included, before any run starts
        sweep.cells.append(Cell(name, settings, texts, cfg, cell_methods))
    for cell in sweep.cells:
        for method in cell.methods:
            for seed in seeds:
                sweep.runs.append(_plan_run(sweep, cell, method, seed))
    _mark_finished(sweep)
    return sweep


def _plan_run(sweep: Sweep, cell: Cell, method: str, seed: int) -> Run:

    cfg = run_config(cell.cfg, method, seed)
    if sweep.evaluation == "classification":
        cfg.train.test_at_end = True
    stem = f"{cell.name}__{cfg.name}" if cell.name else cfg.name
    return Run(cell.name, method, seed, cfg, sweep.out / "logs" / f"{stem}.log")


def _plain(d: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(d))


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``key: saved -> planned`` for every training-relevant key that differs (``fewshot``/``analysis`` ignored)."""
    planned = _plain(to_dict(cfg))
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                key = f"{prefix}{k}"
                if key not in IGNORED_SECTIONS:
                    walk(a.get(k), b.get(k), key + ".")
        elif a != b:
            out.append(f"{prefix.rstrip('.')}: {a!r} -> {b!r}")

    walk(saved, planned, "")
    return out


def _mark_finished(sweep: Sweep) -> None:
    """Mark runs finished before this sweep as ``reused``; refuse run directories that hold another config."""
    conflicts = []
    for run in sweep.runs:
        saved = run.run_dir / "config.yaml"
        if not saved.is_file():
            continue
        diff = config_differences(yaml.safe_load(saved.read_text()) or {}, run.cfg)
        if diff:
            conflicts.append(f"{run.run_dir} ({'; '.join(diff[:2])})")
        elif (run.run_dir / "final.json").is_file():
            run.status = "reused"
            run.seconds = json.loads((run.run_dir / "final.json").read_text()).get("train_seconds")
    if conflicts:
        raise ValueError(f"{len(conflicts)} run director{'y holds a run' if len(conflicts) == 1 else 'ies hold runs'} "
                         f"of another config, e.g. {conflicts[0]}; use another --out or remove them")


# --------------------------------------------------------------------------- running


@dataclass
class ExecutorOptions:
    """How the jobs run (see :func:`schane.pipelines.sweep_executors.execute`).

    Attributes:
        executor: ``local`` (processes on this machine), ``submitit-local`` (submitit's local executor) or
            ``slurm`` (a submitit array job).
        jobs: runs at once (local: default the threads torch would use, or the GPUs; slurm: the array's
            parallelism, default all).
        partition, gpus_per_node, cpus_per_task, time_min, signal: Slurm options (``signal`` is sent
            ``signal_delay_s`` before the time limit; it must be one of ``train.stop_signals``).
    """

    executor: str = "local"
    jobs: int | None = None
    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time_min: int = 240
    signal: str = "SIGUSR1"
    signal_delay_s: int = 120


def plan_line(sweep: Sweep, opts: ExecutorOptions, threads: int | None, jobs: int) -> str:
    """The plan printed before anything starts: cells, runs, executor, threads and, when known, the time."""
    todo = [r for r in sweep.runs if r.status not in FINISHED]
    grid = " x ".join(f"{','.join(a.keys)} ({len(a.values)})" for a in sweep.axes) or "no grid"
    line = (f"sweep: {len(sweep.cells)} cell(s) [{grid}] x {len(sweep.cells[0].methods)} method(s) x "
            f"{len(sweep.seeds)} seed(s) = {len(sweep.runs)} runs ({len(sweep.runs) - len(todo)} finished before, "
            f"{len(todo)} to run), executor {opts.executor}, {jobs} at once, "
            f"{threads if threads is not None else 'cpus-per-task'} thread(s) per run, evaluation {sweep.evaluation}, "
            f"output {sweep.out}")
    done = [r.seconds for r in sweep.runs if r.status in FINISHED and r.seconds]
    if todo and done:

        per = sum(done) / len(done)
        line += f"; estimated {format_duration(per * math.ceil(len(todo) / max(jobs, 1)))} of training " \
                f"({per:.0f} s per finished run)"
    return line


def run_sweep(base: Config, grid: Sequence[str | GridAxis] = (), methods: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, out: str | Path | None = None, *,
              options: ExecutorOptions | None = None, cells: Sequence[CellSpec] | None = None,
              evaluation: str = "auto", command: str | None = None) -> dict[str, Any]:
    """Plan, train every unfinished run, evaluate every cell and write ``sweep.json``, ``report.md`` and plots.

    Args:
        base, grid, methods, seeds, out, cells, evaluation: see :func:`plan_sweep`.
        options: the executor (default: local processes).
        command: the command line, recorded in ``sweep.json`` and the report.

    Returns:
        The contents of ``out/sweep.json``: ``cells`` (each with ``settings``, ``runs`` and ``metrics``:
        ``{metric: {"rows": [per method across seeds], "differences": [paired, per pair of methods]}}``),
        ``runs`` and ``failed`` (every run that did not finish, with its log), ``files`` and ``seconds``.

    Raises:
        ValueError: as :func:`plan_sweep`, or on invalid executor options.
        ImportError: when the executor needs submitit and it is not installed.
    """
    # import cycle: the executors and the report build on this module's plan
    from schane.pipelines.sweep_executors import execute  # import cycle (see above)
    from schane.pipelines.sweep_report import gather, write_outputs  # import cycle (see above)

    t0 = time.perf_counter()
    opts = options or ExecutorOptions()
    sweep = plan_sweep(base, grid, methods, seeds, out, cells=cells, evaluation=evaluation)
    execute(sweep, opts)
    results = gather(sweep)
    results.update(command=command, executor=opts.executor, seconds=time.perf_counter() - t0)
    write_outputs(sweep, results)
    return results


class RunsFailed(RuntimeError):
    """Some runs of a sweep did not finish; ``runs`` lists them (each with its log)."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        super().__init__(failure_text(self.runs))


def failure_text(runs: Sequence[Run]) -> str:
    """One line per run that did not finish: its label, status, error and log."""
    lines = [f"{len(runs)} run(s) did not finish (the others are kept; submit the sweep again to retry):"]
    lines += [f"  {r.label}: {r.status}{': ' + r.error if r.error else ''} (log: {r.log})" for r in runs]
    return "\n".join(lines)


__all__ = ["CellSpec", "ExecutorOptions", "GridAxis", "Run", "RunsFailed", "Sweep", "config_differences",
           "evaluation_for", "failure_text", "parse_grid", "parse_list", "parse_scalar", "parse_seeds",
           "plan_line", "plan_sweep", "run_sweep"]
