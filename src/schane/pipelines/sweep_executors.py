"""How a sweep's runs are executed: local processes, or submitit (its local executor, or a Slurm array job).

Every run is one job that calls :func:`run_job`: ``train(cfg, resume="auto")`` on the run's resolved config,
with its output in ``OUT/logs/<run>.log`` and its share of threads. A job never raises: a failure is
recorded with its one-line error and the log, and the other jobs go on.

* ``local``: ``python -m schane.pipelines.sweep_executors JOB.json`` per run, at most ``jobs`` at once, each
  with ``OMP_NUM_THREADS`` = ``torch.get_num_threads() // jobs`` (at least 1) and, on a machine with GPUs and
  ``train.device`` auto/cuda, one GPU (``CUDA_VISIBLE_DEVICES``, round robin over the slots). Ctrl-C or SIGTERM
  stops every job at a step boundary with its ``last.pt`` written (``train.stop_signals``). With ``jobs=1`` on
  a CPU the runs train one after another in the sweep's own process with all its threads (as ``schane
  fewshot`` does; no process start-up per run), their output both in the log and on the terminal.
* ``slurm``: one submitit array job (``executor.map_array``), ``jobs`` at a time. Slurm sends ``signal`` (one of
  ``train.stop_signals``) before the time limit; the run stops at a step boundary with ``last.pt`` written and
  the job requeues itself through submitit's checkpointing, resuming where it stopped.
* ``submitit-local``: the same code path on submitit's ``LocalExecutor`` (``jobs`` at a time), which the test
  suite runs without Slurm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from schane.config import from_dict, to_dict
from schane.distributed import PREEMPTED_EXIT_CODE
from schane.pipelines.sweep import FINISHED, ExecutorOptions, Run, Sweep, plan_line
from schane.pipelines.train import TrainingPreempted, train
from schane.progress import setup_logging

logger = logging.getLogger("schane.pipelines.sweep_executors")  # also when run as __main__

EXECUTORS = ("local", "submitit-local", "slurm")
SUBMITIT_HINT = "pip install 'schane[sweep]' (or pip install submitit)"


def thread_budget() -> int:
    """The threads one run in this process would use (torch's default: physical cores or ``OMP_NUM_THREADS``)."""
    import torch

    return max(1, torch.get_num_threads())


def _gpus(sweep: Sweep) -> int:
    if sweep.base.train.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_options(opts: ExecutorOptions, sweep: Sweep) -> None:
    """Reject options that cannot work before any job starts.

    Raises:
        ValueError: on an unknown executor, ``jobs`` < 1 or a ``signal`` the runs do not stop on.
        ImportError: when submitit is needed and missing (one line naming the pip command).
    """
    if opts.executor not in EXECUTORS:
        raise ValueError(f"--executor {opts.executor!r}: use one of {', '.join(EXECUTORS)}")
    if opts.jobs is not None and opts.jobs < 1:
        raise ValueError(f"--jobs {opts.jobs}: need at least 1")
    if opts.time_min < 1:
        raise ValueError(f"--time {opts.time_min}: need at least 1 minute")
    if opts.executor != "local":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ImportError(f"--executor {opts.executor} needs submitit: {SUBMITIT_HINT}") from None
    if opts.executor == "slurm":
        sig = opts.signal if opts.signal.startswith("SIG") else f"SIG{opts.signal}"
        if not hasattr(signal, sig):
            raise ValueError(f"--signal {opts.signal!r}: not a signal name (e.g. SIGUSR1)")
        stops = sweep.base.train.stop_signals
        if sig not in stops:
            raise ValueError(f"--signal {sig}: the runs stop only on train.stop_signals {list(stops)}; pick one of "
                             f"them or add it with --set 'train.stop_signals=[SIGTERM, {sig}]'")


def execute(sweep: Sweep, opts: ExecutorOptions) -> None:
    """Run every unfinished run of ``sweep`` as a job; set each run's ``status``, ``error`` and ``seconds``.

    Raises:
        ValueError, ImportError: see :func:`check_options`.
        KeyboardInterrupt: after Ctrl-C, once the local jobs stopped with their checkpoints written.
    """
    check_options(opts, sweep)
    todo = [r for r in sweep.runs if r.status not in FINISHED]
    gpus = _gpus(sweep) if opts.executor == "local" else 0
    if opts.executor == "slurm":
        jobs = opts.jobs or max(len(todo), 1)
        threads = opts.cpus_per_task
    else:
        budget = thread_budget()
        jobs = opts.jobs or max(1, min(len(todo), gpus or budget))
        threads = max(1, budget // jobs)
    logger.info("%s", plan_line(sweep, opts, threads, jobs))
    if not todo:
        return
    (sweep.out / "logs").mkdir(parents=True, exist_ok=True)
    if opts.executor == "local":
        assert threads is not None  # set from the thread budget for local runs
        _run_local(todo, sweep.out, jobs, threads, gpus)
    else:
        _run_submitit(todo, sweep.out, opts, jobs, threads)
    n_ok = sum(r.status == "finished" for r in todo)
    logger.info("[sweep] %d of %d run(s) trained; %d did not finish", n_ok, len(todo), len(todo) - n_ok)


def job_spec(run: Run, threads: int | None) -> dict[str, Any]:
    """What a job needs: the run's resolved config, its log, its threads and the working directory."""

    return {"label": run.label, "config": to_dict(run.cfg), "log": str(run.log), "threads": threads,
            "cwd": os.getcwd()}


# --------------------------------------------------------------------------- the job


class _Tee:
    """A text stream writing to a log file and to the terminal's stream (not a terminal itself: no bars)."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _log_to(path: str | None, tee: bool = False) -> Iterator[None]:
    """Standard output and error (and the ``schane`` log lines) appended to ``path`` (``None``: unchanged), and
    with ``tee`` still shown where they went before."""

    setup_logging()
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as f:
        out, err = (_Tee(f, sys.stdout), _Tee(f, sys.stderr)) if tee else (f, f)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield


def run_job(spec: dict[str, Any], *, redirect: bool = True, tee: bool = False) -> dict[str, Any]:
    """Train one run of a sweep (``resume="auto"``: a finished run is reused, an unfinished one resumed).

    Args:
        spec: :func:`job_spec`'s dict.
        redirect: append this process's output to ``spec["log"]`` (a local job's output is already there).
        tee: with ``redirect``, also show the output where it went before (a run in the sweep's own process).

    Returns:
        ``{"status": "finished" | "stopped" | "failed", "error": one line or None, "seconds", "log"}``.
    """
    import torch


    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("cwd"):
        os.chdir(spec["cwd"])
    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": "failed", "error": None, "log": spec["log"]}
    with _log_to(spec["log"] if redirect else None, tee):
        logger.info("[sweep] %s: %d thread(s), host %s, pid %d", spec["label"], torch.get_num_threads(),
                    os.uname().nodename, os.getpid())
        try:
            train(from_dict(spec["config"]), resume="auto")
            out["status"] = "finished"
        except TrainingPreempted as e:
            out.update(status="stopped", error=str(e))
        except Exception as e:  # the sweep goes on; the log holds the traceback
            traceback.print_exc()
            out["error"] = _one_line(e)
        out["seconds"] = time.perf_counter() - t0
        logger.info("[sweep] %s: %s in %.0f s", spec["label"], out["status"], out["seconds"])
    return out


class SubmititJob:
    """The callable a submitit job runs: :func:`run_job`, requeued through submitit when a stop signal ends it.

    On Slurm the signal before the time limit (or a preemption's SIGTERM) stops the run at a step boundary
    with ``last.pt`` written; the job then asks submitit to requeue it (by sending itself submitit's
    checkpoint signal), and the requeued job resumes the run.
    """

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        out = run_job(spec)
        if out["status"] == "stopped" and self.requeue:
            sig = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
            os.kill(os.getpid(), getattr(signal, sig))  # submitit's handler: checkpoint(), requeue, exit
            time.sleep(60)
        return out

    def checkpoint(self, spec: dict[str, Any]) -> Any:
        """What submitit resubmits: the same job (its run resumes from ``last.pt``)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)


# --------------------------------------------------------------------------- local processes


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _apply(run: Run, result: dict[str, Any]) -> None:
    run.status, run.error, run.seconds = result["status"], result.get("error"), result.get("seconds")


def _last_line(path: Path) -> str | None:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None


def _report(run: Run, done: int, total: int) -> None:
    secs = f" in {run.seconds:.0f} s" if run.seconds is not None else ""
    if run.status == "finished":
        logger.info("[sweep] %d/%d %s finished%s", done, total, run.label, secs)
    else:
        logger.warning("[sweep] %d/%d %s %s%s: %s (log: %s)", done, total, run.label, run.status, secs,
                       run.error or "see the log", run.log)


def _run_inline(runs: Sequence[Run]) -> None:
    """One run at a time in this process (``jobs=1``), with all its threads, as ``schane fewshot`` trains; a
    stop signal ends the sweep after the stopped run's checkpoint is written."""
    for i, run in enumerate(runs):
        spec = {**job_spec(run, None), "cwd": None}
        logger.info("[sweep] %d/%d %s (log: %s)", i + 1, len(runs), run.label, run.log)
        _apply(run, run_job(spec, tee=True))  # its last line says how it ended
        if run.status != "finished":
            _report(run, i + 1, len(runs))
        if run.status == "stopped":
            for rest in runs[i + 1:]:
                rest.status, rest.error = "stopped", "not started: the sweep was stopped"
            return


def _run_local(runs: Sequence[Run], out: Path, jobs: int, threads: int, gpus: int) -> None:
    """At most ``jobs`` worker processes at once (one: in this process); SIGTERM/Ctrl-C stop them at a step
    boundary."""
    if jobs == 1:
        _run_inline(runs)
        return
    spec_dir = out / "jobs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    pending = list(runs)
    running: dict[int, tuple[subprocess.Popen[bytes], Run, Path, Any, float]] = {}
    done = 0
    stop: list[int] = []
    terminated = False
    old = signal.signal(signal.SIGTERM, lambda s, f: stop.append(s)) if _main_thread() else None
    try:
        while pending or running:
            for slot in range(jobs):
                if slot in running or not pending or stop:
                    continue
                run = pending.pop(0)
                spec_path = spec_dir / f"{run.log.stem}.json"
                result_path = spec_dir / f"{run.log.stem}.result.json"
                result_path.unlink(missing_ok=True)
                spec_path.write_text(json.dumps({**job_spec(run, threads), "result": str(result_path)}))
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                log = open(run.log, "a")  # noqa: SIM115 (closed when the process ends)
                proc = subprocess.Popen([sys.executable, "-m", "schane.pipelines.sweep_executors", str(spec_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[slot] = (proc, run, result_path, log, time.perf_counter())
                logger.info("[sweep] started %s (log: %s)", run.label, run.log)
            if stop and not running:
                break
            if stop and not terminated:
                _terminate(running)
                terminated = True
            time.sleep(0.2)
            for slot, (proc, run, result_path, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                done += 1
                if result_path.is_file():
                    _apply(run, json.loads(result_path.read_text()))
                else:
                    run.status = "failed"
                    run.error = f"the job process exited with code {proc.returncode}: {_last_line(run.log)}"
                    run.seconds = time.perf_counter() - t0
                _report(run, done, len(runs))
    except BaseException:
        _terminate(running)
        for proc, *_ in running.values():
            _wait(proc)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    for run in pending:
        run.status, run.error = "stopped", "not started: the sweep was stopped"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminate(running: dict[int, tuple[Any, ...]]) -> None:
    for proc, *_ in running.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)


def _wait(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- submitit


def submitit_executor(out: Path, opts: ExecutorOptions, jobs: int) -> Any:
    """submitit's ``AutoExecutor`` for ``opts`` (Slurm or local), its files in ``out/submitit``.

    On Slurm: ``jobs`` array tasks at a time, ``--signal=SIG@delay`` (``opts.signal``, one of
    ``train.stop_signals``), partition, GPUs and CPUs per task, the time limit.
    """
    import submitit

    slurm = opts.executor == "slurm"
    executor = submitit.AutoExecutor(folder=out / "submitit", cluster="slurm" if slurm else "local")
    params: dict[str, Any] = {"timeout_min": opts.time_min, "name": f"schane-sweep-{out.name}"}
    if opts.gpus_per_node is not None:
        params["gpus_per_node"] = opts.gpus_per_node
    if slurm:
        sig = opts.signal.removeprefix("SIG")
        params.update(slurm_array_parallelism=jobs, slurm_signal_delay_s=opts.signal_delay_s,
                      slurm_additional_parameters={"signal": f"{sig}@{opts.signal_delay_s}"})
        if opts.partition is not None:
            params["slurm_partition"] = opts.partition
        if opts.cpus_per_task is not None:
            params["cpus_per_task"] = opts.cpus_per_task
    executor.update_parameters(**params)
    return executor


def _run_submitit(runs: Sequence[Run], out: Path, opts: ExecutorOptions, jobs: int, threads: int | None) -> None:
    """One ``map_array`` (Slurm: with ``array_parallelism=jobs``; local executor: ``jobs`` per array)."""
    import submitit

    slurm = opts.executor == "slurm"
    executor = submitit_executor(out, opts, jobs)
    waves = [list(runs)] if slurm else [list(runs[i:i + jobs]) for i in range(0, len(runs), jobs)]
    done = 0
    for wave in waves:
        specs = [job_spec(r, threads) for r in wave]
        submitted = executor.map_array(SubmititJob(requeue=slurm), specs)
        ids = {id(j): r for j, r in zip(submitted, wave, strict=True)}
        logger.info("[sweep] submitted %d job(s) (%s); submitit's files: %s", len(submitted),
                    submitted[0].job_id.split("_")[0] if submitted else "-", out / "submitit")
        try:
            for job in submitit.helpers.as_completed(submitted, poll_frequency=30 if slurm else 0.5):
                run = ids[id(job)]
                try:
                    _apply(run, job.result())
                except Exception as e:  # the job died (killed, out of memory, node failure)
                    run.status, run.error = "failed", _one_line(e)
                    with contextlib.suppress(OSError), open(run.log, "a") as f:
                        f.write(f"\nsubmitit job {job.job_id} failed:\n{e}\nsubmitit's own logs: {job.paths.stderr}\n")
                done += 1
                _report(run, done, len(runs))
        except BaseException:  # Ctrl-C: the jobs are cancelled (SIGTERM first: each run writes its last.pt)
            for job in submitted:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            raise


def main(argv: list[str] | None = None) -> int:
    """A local job: ``python -m schane.pipelines.sweep_executors JOB.json`` (exit 0 finished, 143 stopped, 1 failed)."""

    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    out = run_job(spec, redirect=False)
    Path(spec["result"]).write_text(json.dumps(out))
    return {"finished": 0, "stopped": PREEMPTED_EXIT_CODE}.get(out["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
