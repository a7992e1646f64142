"""One-command check of the whole stack on a GPU: loss correctness, loss speed/memory, training throughput.

Prints a single markdown report and (``--out``) writes the same figures as JSON. Sections:

1. **correctness**: every contrastive loss on the device in fp32 and under bf16 and fp16 autocast (the
   embeddings come out of a ``Linear`` layer run under autocast, as in training), plain, with ``chunk_size``
   and with reference embeddings (the memory-queue path), eager and compiled block kernels; value and gradient
   against the float64 CPU result on the same embedding values;
2. **loss speed and peak CUDA memory**: ``SCHaNeLoss`` (eager and compiled) vs PML ``SupConLoss`` vs the
   matmul floor (the four products of a recomputing loss), forward+backward, D = 128, 100 classes, at
   N = 4k and 16k unchunked and 64k chunked;
3. **training step**: timm ViT-B/16 (random init), 64 images x 2 views, bf16 autocast, AdamW with layer decay;
   CE vs SCHaNe + CE, the overhead in %;
4. **BEiT-3 base/16**: forward+backward images/s at 224 px (built by ``schane.models.build_model``, random
   init), bf16;
4b. **full size** (``benchmarks/full_size.py``): BEiT-3 base/16 and ViT-B/16 SCHaNe training steps at 224 px
   through the paper config, activation checkpointing off and on: peak CUDA memory per image (batches 16
   and 32) and time per image, bf16;
5. **few-shot feature extraction**: pooled BEiT-3 base/16 features under ``no_grad``, images/s.

``--tiny`` runs the same code on the CPU at toy sizes (a 2-block tiny ViT at 32 px, ``beit3_tiny``, small N,
eager kernels only, one thread) so that a test keeps the script working. The exit status is 1 if a correctness check fails or a section
raises (the report says which), 2 without a CUDA device (and without ``--tiny``).

Usage:
    python benchmarks/gpu_check.py --out gpu_check.json            # on a machine with a CUDA GPU, < 8 min
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json  # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from schane.engine.optim import param_groups_layer_decay
from schane.losses import JointLoss, build_contrastive_loss
from schane.losses._blockops import get_ops
from schane.models import build_model

D, CLASSES = 128, 100
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative tolerances (value, gradient); the loss computes in float32 whatever the input dtype, and returns the
# gradient in the embeddings' dtype, so the gradient tolerance follows that dtype's resolution
TOLERANCES = {"fp32": (1e-4, 1e-4), "bf16": (1e-4, 1.6e-2), "fp16": (1e-4, 2e-3)}
LOSSES = {
    "schane": ("schane", {"temperature": 0.5, "beta": 1.0}),
    "schane each b=2": ("schane", {"temperature": 0.2, "beta": 2.0, "positive_mode": "each"}),
    "schane detached w": ("schane", {"temperature": 0.5, "beta": 1.0, "detach_weights": True}),
    "supcon": ("supcon", {"temperature": 0.1}),
    "simclr": ("simclr", {"temperature": 0.5}),
    "hcl": ("hcl", {"temperature": 0.5, "beta": 1.0, "tau_plus": 0.1}),
}

TINY = {
    "corr_n": 32,
    "corr_ref": 16,
    "corr_chunk": 12,
    "sizes": [(64, None), (256, None), (512, 64)],
    "speed_repeats": 3,
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32, 4),
    "vit_steps": 2,
    "beit": ("beit3_tiny", 32, 4),
    "beit_steps": 2,
    "full_size": ([("beit3_tiny", ["data.img_size=32"]), ("vit_tiny_patch16_224", ["data.img_size=32",
                  "model.backbone_kwargs={img_size: 32, depth: 2}"])], (1, 2)),
    "feat_batch": 8,
    "feat_steps": 2,
    "backends": ["eager"],
}
FULL = {
    "corr_n": 512,
    "corr_ref": 256,
    "corr_chunk": 96,
    "sizes": [(4096, None), (16384, None), (65536, 8192)],
    "speed_repeats": 5,
    "vit": ("vit_base_patch16_224", {}, 224, 64),
    "vit_steps": 10,
    "beit": ("beit3_base_patch16_224", 224, 64),
    "beit_steps": 10,
    "full_size": ([("beit3_base_patch16_224", []), ("vit_base_patch16_224", [])], (16, 32)),
    "feat_batch": 256,
    "feat_steps": 10,
    "backends": ["eager", "compile"],
}
PML_MAX_N = 16384  # PML SupConLoss keeps ~11 float32 N x N matrices: ~190 GB at N = 65,536


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory (MB) allocated by one call beyond what was allocated before it; None on CPU."""
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _model_cfg(backbone: str, **backbone_kwargs: Any) -> SimpleNamespace:
    """The fields of ``schane.config.ModelConfig`` that :func:`schane.models.build_model` reads."""
    return SimpleNamespace(
        backbone=backbone,
        pretrained=False,
        checkpoint=None,
        proj_dim=128,
        drop_path=0.0,
        drop_rate=0.0,
        backbone_kwargs=backbone_kwargs,
    )


# ---- 1. correctness -------------------------------------------------------------------------------------


def _corr_inputs(name: str, n: int, n_ref: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    supervised = name in ("schane", "supcon")
    y = torch.randint(0, 12, (n,), generator=g) if supervised else torch.arange(n // 2).repeat(2)
    ref = F.normalize(torch.randn(n_ref, D, generator=g), dim=1)  # a queue holds detached float32 projections
    ref_y = torch.randint(0, 12, (n_ref,), generator=g) if supervised else torch.arange(n, n + n_ref)
    lin = torch.nn.Linear(64, D)
    return x.to(device), y.to(device), ref.to(device), ref_y.to(device), lin.to(device)


def _one_correctness(key, precision, path, backend, sizes, device) -> dict[str, Any]:
    name, kw = LOSSES[key]
    x, y, ref, ref_y, lin = _corr_inputs(name, sizes["corr_n"], sizes["corr_ref"], device)
    chunk = sizes["corr_chunk"] if path == "chunk_size" else None
    loss_fn = build_contrastive_loss(name, chunk_size=chunk, backend=backend, **kw)
    extra = (ref, ref_y) if path == "queue (ref)" else ()
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        emb = lin(x)
        emb.retain_grad()
        value = loss_fn(emb, y, *extra)
    value.backward()
    ref_fn = build_contrastive_loss(name, chunk_size=None, backend="eager", **kw)
    e64 = emb.detach().double().cpu().requires_grad_()
    v64 = ref_fn(e64, y.cpu(), *[t.double().cpu() if t.is_floating_point() else t.cpu() for t in extra])
    (g64,) = torch.autograd.grad(v64, e64)
    v, r = value.item(), v64.item()
    v_err = abs(v - r) / max(abs(r), 1e-6)
    g_err = float((emb.grad.double().cpu() - g64).abs().max() / g64.abs().max().clamp(min=1e-12))
    tol_v, tol_g = TOLERANCES[precision]
    return {
        "loss": key,
        "precision": precision,
        "path": path,
        "backend": backend,
        "emb_dtype": str(emb.dtype),
        "value_rel_err": v_err,
        "grad_rel_err": g_err,
        "tol_value": tol_v,
        "tol_grad": tol_g,
        "ok": bool(v_err <= tol_v and g_err <= tol_g and torch.isfinite(emb.grad).all()),
    }


def check_correctness(sizes: dict, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for backend in sizes["backends"]:
        for key in LOSSES:
            for precision in PRECISIONS:
                for path in ("plain", "chunk_size", "queue (ref)"):
                    rows.append(_one_correctness(key, precision, path, backend, sizes, device))
    return rows


# ---- 2. loss speed and memory ---------------------------------------------------------------------------


def matmul_floor(z: torch.Tensor, chunk: int | None) -> None:
    """The four products of a recomputing loss (``s`` forward, ``s`` backward, ``G C``, ``G^T A``), chunked."""
    n = z.shape[0]
    step = chunk or n
    d_c = torch.zeros_like(z)
    for i in range(0, n, step):
        a = z[i : i + step]
        s = a @ z.T
        del s
        g = a @ z.T
        _ = g @ z
        d_c.addmm_(g.T, a)


def _speed_methods(n: int, chunk: int | None, backends: list[str]) -> dict[str, Callable | None]:
    methods: dict[str, Callable | None] = {"matmul floor": None}
    for b in backends:
        label = "SCHaNeLoss" + (f" chunk_size={chunk}" if chunk else "") + f" ({b})"
        methods[label] = build_contrastive_loss(
            "schane", temperature=0.5, beta=1.0, chunk_size=chunk, backend=b
        )
    try:
        from pytorch_metric_learning.losses import SupConLoss as PMLSupCon
    except ImportError:
        methods["PML SupConLoss"] = "not run: pytorch-metric-learning is not installed"
    else:
        methods["PML SupConLoss"] = (
            PMLSupCon(temperature=0.5)
            if n <= PML_MAX_N
            else f"not run: needs ~11 N x N float32 matrices at N={n}"
        )
    return methods


def _speed_call(fn: Callable | None, x, y, z, chunk: int | None) -> Callable[[], None]:
    """One forward+backward of ``fn`` (a loss) on ``x, y``, or the matmul floor on ``z`` when ``fn`` is None."""
    if fn is None:
        return lambda: matmul_floor(z, chunk)
    return lambda: fn(x.clone().requires_grad_(), y).backward()


def check_loss_speed(sizes: dict, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for n, chunk in sizes["sizes"]:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, D, generator=g).to(device)
        y = torch.randint(0, CLASSES, (n,), generator=g).to(device)
        z = F.normalize(x, dim=1)
        results = {}
        for label, fn in _speed_methods(n, chunk, sizes["backends"]).items():
            if isinstance(fn, str):
                results[label] = {"note": fn}
                continue
            call = _speed_call(fn, x, y, z, chunk)
            times = _timed(call, device, sizes["speed_repeats"])
            results[label] = {
                "time_s": statistics.median(times),
                "runs_s": times,
                "peak_mb": _peak_mb(call, device),
            }
        floor_t = results["matmul floor"]["time_s"]
        pml_t = results.get("PML SupConLoss", {}).get("time_s")
        for label, r in results.items():
            if "time_s" in r:
                r["vs_floor"] = r["time_s"] / floor_t
                r["vs_pml"] = r["time_s"] / pml_t if pml_t else None
            rows.append({"n": n, "chunk": chunk, "method": label, **r})
    return rows


# ---- 3-5. models ----------------------------------------------------------------------------------------


def _amp(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


def check_train_step(sizes: dict, device: torch.device) -> dict[str, Any]:
    backbone, kwargs, img, batch = sizes["vit"]
    torch.manual_seed(0)
    model = build_model(_model_cfg(backbone, **kwargs), num_classes=CLASSES).to(device).train()
    groups = param_groups_layer_decay(model, 0.05, 0.65)
    for grp in groups:
        grp["lr"] = 1e-4 * grp["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=1e-4)
    x = torch.randn(2 * batch, 3, img, img, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device).repeat(2)
    objectives = {"CE": JointLoss(None), "SCHaNe + CE": JointLoss(build_contrastive_loss("schane"), lam=0.9)}
    amp = _amp(device)

    def step(joint: JointLoss) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        res = joint(out.logits.float(), y, out.projections.float() if joint.contrastive is not None else None)
        res.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {k: [] for k in objectives}
    for k in objectives:
        _timed(lambda k=k: step(objectives[k]), device, 0, warmup=2)
    for r in range(sizes["vit_steps"]):
        for k in list(objectives) if r % 2 == 0 else list(reversed(objectives)):
            times[k] += _timed(lambda k=k: step(objectives[k]), device, 1, warmup=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "backbone": backbone,
        "img_size": img,
        "images": batch,
        "views": 2 * batch,
        "amp": str(amp),
        "step_s": med,
        "runs_s": times,
        "views_per_s": {k: 2 * batch / v for k, v in med.items()},
        "overhead_pct": 100.0 * (med["SCHaNe + CE"] / med["CE"] - 1.0),
    }


def check_beit3(sizes: dict, device: torch.device) -> dict[str, Any]:
    backbone, img, batch = sizes["beit"]
    torch.manual_seed(0)
    model = build_model(_model_cfg(backbone), num_classes=1000).to(device).train()
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = _amp(device)

    def fwd_bwd() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        F.cross_entropy(out.logits.float(), y).backward()
        model.zero_grad(set_to_none=True)

    times = _timed(fwd_bwd, device, sizes["beit_steps"], warmup=2)
    t = statistics.median(times)
    return {
        "backbone": backbone,
        "img_size": img,
        "batch": batch,
        "amp": str(amp),
        "step_s": t,
        "runs_s": times,
        "images_per_s": batch / t,
        "peak_mb": _peak_mb(fwd_bwd, device),
    }


def check_full_size(sizes: dict, device: torch.device) -> list[dict[str, Any]]:
    """benchmarks/full_size.py on this device: memory per image (peak difference of two batch sizes) and time
    per image of a SCHaNe training step (paper config, 2 views, AdamW), activation checkpointing off and on,
    autocast bf16 on CUDA (fp32 in the CPU smoke run)."""
    from full_size import measure

    models, batches = sizes["full_size"]
    amp = "bf16" if device.type == "cuda" else "none"
    rows = []
    for backbone, overrides in models:
        for ck in (False, True):
            rows.append(measure(backbone, ck, device=device.type, amp=amp, batches=batches, overrides=overrides))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_features(sizes: dict, device: torch.device) -> dict[str, Any]:
    backbone, img, _ = sizes["beit"]
    batch = sizes["feat_batch"]
    torch.manual_seed(0)
    model = build_model(_model_cfg(backbone), num_classes=64).to(device).eval()
    x = torch.randn(batch, 3, img, img, device=device)
    amp = _amp(device)

    @torch.no_grad()
    def extract() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model.forward_features(x).float()

    times = _timed(extract, device, sizes["feat_steps"], warmup=2)
    t = statistics.median(times)
    return {"backbone": backbone, "img_size": img, "batch": batch, "amp": str(amp), "images_per_s": batch / t}


# ---- report ---------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _md_correctness(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if not r["ok"]]
    out = [
        f"{len(rows) - len(bad)} of {len(rows)} checks pass (relative to the float64 CPU loss and gradient on the "
        "same embedding values; the largest errors per precision:)",
        "",
        "| precision | embeddings | max value error | max gradient error | tolerance (value, gradient) |",
        "|---|---|---|---|---|",
    ]
    for p in PRECISIONS:
        sel = [r for r in rows if r["precision"] == p]
        if sel:
            out.append(
                f"| {p} | {sel[0]['emb_dtype']} | {max(r['value_rel_err'] for r in sel):.1e} | "
                f"{max(r['grad_rel_err'] for r in sel):.1e} | {TOLERANCES[p][0]:.1e}, {TOLERANCES[p][1]:.1e} |"
            )
    if bad:
        out += ["", "Failures:", "", "| loss | precision | path | backend | value error | gradient error |"]
        out += ["|---|---|---|---|---|---|"]
        out += [
            f"| {r['loss']} | {r['precision']} | {r['path']} | {r['backend']} | {r['value_rel_err']:.1e} | "
            f"{r['grad_rel_err']:.1e} |"
            for r in bad
        ]
    return out


def _md_speed(rows: list[dict]) -> list[str]:
    out = [
        "| N | method | fwd+bwd (ms) | vs floor | vs PML SupCon | peak memory (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "note" in r:
            out.append(f"| {r['n']} | {r['method']} | {r['note']} | | | |")
        else:
            out.append(
                f"| {r['n']} | {r['method']} | {1000 * r['time_s']:.1f} | {r['vs_floor']:.2f}x | "
                f"{_fmt(r['vs_pml'], '.2f')} | {_fmt(r['peak_mb'])} |"
            )
    return out


def _md_models(res: dict) -> list[str]:
    out = []
    t = res.get("train_step")
    if isinstance(t, dict) and "step_s" in t:
        out += [
            f"### Training step: {t['backbone']} (random init), {t['images']} images x 2 views, {t['img_size']} px, "
            f"autocast {t['amp']}",
            "",
            "| objective | step (ms) | views/s |",
            "|---|---|---|",
            *[f"| {k} | {1000 * v:.1f} | {t['views_per_s'][k]:.0f} |" for k, v in t["step_s"].items()],
            "",
            f"SCHaNe overhead: {t['overhead_pct']:+.1f}% of the CE step.",
            "",
        ]
    b = res.get("beit3")
    if isinstance(b, dict) and "images_per_s" in b:
        out += [
            f"### {b['backbone']} forward+backward, {b['img_size']} px, batch {b['batch']}, autocast {b['amp']}",
            "",
            f"{b['images_per_s']:.0f} images/s ({1000 * b['step_s']:.0f} ms per batch), peak memory "
            f"{_fmt(b['peak_mb'])} MB.",
            "",
        ]
    fs = res.get("full_size")
    if isinstance(fs, list) and fs:
        from full_size import _markdown

        out += [f"### Full-size training step (paper config, 2 views), {fs[0]['img_size']} px: memory and time "
                "per image, activation checkpointing off / on", "", _markdown(fs), ""]
    f = res.get("features")
    if isinstance(f, dict) and "images_per_s" in f:
        out += [
            f"### Few-shot feature extraction: {f['backbone']}, {f['img_size']} px, batch {f['batch']}, no_grad, "
            f"autocast {f['amp']}",
            "",
            f"{f['images_per_s']:.0f} images/s.",
            "",
        ]
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# schane GPU check" + (" (--tiny, CPU smoke run)" if res["tiny"] else ""),
        "",
        f"Device: {m['device']}; torch {m['torch']}, CUDA {m['cuda']}; compiled loss kernels: {m['compiled']}. "
        f"Wall time {res['wall_s']:.0f} s. Result: **{'OK' if res['ok'] else 'FAILED'}**.",
        "",
    ]
    for sec, err in res["errors"].items():
        lines += [f"**{sec} raised**: `{err.splitlines()[-1]}`", ""]
    if isinstance(res.get("correctness"), list):
        lines += ["## Correctness", "", *_md_correctness(res["correctness"]), ""]
    if isinstance(res.get("loss_speed"), list):
        lines += [f"## Loss speed and peak memory (D={D}, {CLASSES} classes, fwd+bwd, median)", ""]
        lines += [*_md_speed(res["loss_speed"]), ""]
    lines += _md_models(res)
    return "\n".join(lines)


SECTIONS = {
    "correctness": check_correctness,
    "loss_speed": check_loss_speed,
    "train_step": check_train_step,
    "beit3": check_beit3,
    "full_size": check_full_size,
    "features": check_features,
}


def run(tiny: bool, sections: list[str]) -> dict[str, Any]:
    """Run the chosen sections; a section that raises is recorded (with its traceback) and the rest still run."""
    threads = torch.get_num_threads()
    if tiny:
        torch.set_num_threads(1)  # toy sizes: threads only add synchronisation (and stalls on a busy machine)
    try:
        return _run(tiny, sections)
    finally:
        torch.set_num_threads(threads)


def _run(tiny: bool, sections: list[str]) -> dict[str, Any]:
    device = torch.device("cpu" if tiny else "cuda")
    sizes = TINY if tiny else FULL
    t0 = time.perf_counter()
    res: dict[str, Any] = {"tiny": tiny, "errors": {}}
    compiled = {b: get_ops(b).compiled_for(device, torch.float32) for b in sizes["backends"]}
    res["machine"] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "compiled": "yes"
        if compiled.get("compile")
        else ("not requested" if "compile" not in compiled else "no"),
    }
    for name in sections:
        try:
            res[name] = SECTIONS[name](sizes, device)
        except Exception:  # noqa: BLE001 - a check script reports every failure and goes on
            res["errors"][name] = traceback.format_exc()
        print(f"[gpu_check] {name} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    corr_ok = all(r["ok"] for r in res.get("correctness", []) if isinstance(r, dict))
    res["ok"] = corr_ok and not res["errors"]
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the test's smoke run)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible; run it on a GPU machine, or use --tiny for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    res = run(args.tiny, args.sections)
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
