"""``schane export`` of a run whose backbone is a 🤗 transformers model (``model.backbone=hf:...``).

``OUT_DIR`` receives what ``save_pretrained`` writes (``config.json`` with the class names in ``id2label``,
``model.safetensors`` with the SCHaNe classifier as the model's own ``classifier``), the image processor
(``preprocessor_config.json``, with the run's mean, std and input size), ``schane.json`` (the run's config, which weights, the
preprocessing), ``heads.safetensors`` with ``--heads`` (``classifier.*``, ``projector.*``) and ``README.md``.
``AutoModelForImageClassification.from_pretrained(OUT_DIR)`` loads it with transformers alone; before anything is
kept, that is done here and its logits are compared with schane's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from schane.config import to_dict
from schane.models.hf import quiet_progress, save_hf_classifier
from schane.models.model import SCHaNeModel
from schane.pipelines.export_files import (
    CARD_FILE,
    HEADS_FILE,
    ExportResult,
    export_preprocessing,
    heads_tensors,
    save_safetensors,
)

logger = logging.getLogger(__name__)

SCHANE_FILE = "schane.json"


def export_hf(loaded: Any, state: dict[str, Any], path: str | Path, out: Path, *, which: str, heads: bool) -> Any:
    """Write the transformers export of a loaded run (called by :func:`schane.pipelines.export.export_checkpoint`).

    Returns:
        An :class:`~schane.pipelines.export.ExportResult` with ``kind="hf"``.

    Raises:
        ValueError: when the export does not load in transformers or its logits differ from schane's.
    """
    from transformers import AutoImageProcessor


    model, cfg = loaded.model.cpu().eval(), loaded.cfg
    saved = save_hf_classifier(model.backbone, model.classifier, out, loaded.class_names)
    pre = export_preprocessing(cfg, model)
    files = [out / "config.json", out / "model.safetensors"]
    try:
        with quiet_progress():
            proc = AutoImageProcessor.from_pretrained(str(out), local_files_only=True)
        proc.image_mean, proc.image_std = list(pre["mean"]), list(pre["std"])
        _set_size(proc, int(cfg.data.img_size), float(pre["crop_pct"]))
        proc.save_pretrained(str(out))
        files.append(out / "preprocessor_config.json")
    except (OSError, ValueError, KeyError):
        pass
    if heads:
        files.append(save_safetensors(out / HEADS_FILE, heads_tensors(model)))
    else:
        (out / HEADS_FILE).unlink(missing_ok=True)
    try:
        diff = _verify(out, model, int(cfg.data.img_size))
    except ValueError:
        for f in files:
            f.unlink(missing_ok=True)
        raise
    names = loaded.class_names
    meta = {"format": "schane-export", "version": 1, "kind": "hf", "backbone": cfg.model.backbone,
            "architecture": type(saved).__name__, "weights": which, "source_checkpoint": str(path),
            "global_step": state.get("global_step"), "best_metric": state.get("best_metric"),
            "num_classes": loaded.num_classes, "class_names": names, "proj_dim": model.proj_dim,
            "heads_file": HEADS_FILE if heads else None, "preprocessing": pre, "verified_max_abs_diff": diff,
            "config": to_dict(cfg)}
    (out / SCHANE_FILE).write_text(json.dumps(json.loads(json.dumps(meta)), indent=2) + "\n")
    snippet = load_snippet(out, int(cfg.data.img_size), loaded.num_classes)
    (out / CARD_FILE).write_text(_card(meta, snippet))
    files += [out / SCHANE_FILE, out / CARD_FILE]
    logger.info("exported %s (%s weights) to %s with save_pretrained; reloaded with transformers alone, largest "
                "logit difference %.2e", cfg.model.backbone, which, out, diff)
    return ExportResult(out, files, "hf", which, loaded.num_classes, names, "classifier", diff, snippet)


def _set_size(proc: Any, side: int, crop_pct: float) -> None:
    """Make the image processor give the run's input size (``side`` px) the way it resizes (squash, or resize
    and centre-crop)."""
    size = proc.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    if get("height"):
        proc.size = {"height": side, "width": side}
    elif getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None):
        proc.crop_size = {"height": side, "width": side}
        proc.size = {"shortest_edge": int(round(side / crop_pct))}
    else:  # ConvNeXt: resize to shortest_edge / crop_pct, centre-crop shortest_edge
        proc.size = {"shortest_edge": side}


def load_snippet(out: Path, size: int, num_classes: int) -> str:
    """Python code that loads the export with transformers alone and classifies ``'image.jpg'``."""
    return "\n".join([
        "import torch", "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification", "",
        f"folder = {str(out)!r}  # this export's folder",
        "model = AutoModelForImageClassification.from_pretrained(folder).eval()",
        "processor = AutoImageProcessor.from_pretrained(folder)",
        f"x = processor(Image.open('image.jpg').convert('RGB'), return_tensors='pt')['pixel_values']  # [1, 3, {size}, {size}]",
        "with torch.no_grad():",
        f"    probs = model(pixel_values=x).logits.softmax(-1)  # [1, {num_classes}]",
        "print(model.config.id2label[int(probs.argmax())])", "",
    ])


def _card(meta: dict[str, Any], snippet: str) -> str:
    loss = meta["config"]["loss"]
    names = meta["class_names"]
    cls = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "") if names else "not stored"
    return "\n".join([
        f"# {meta['backbone']} fine-tuned with schane ({loss['name']}, λ = {loss['lam']})", "",
        f"A `{meta['architecture']}` saved with `save_pretrained`: transformers loads it by itself. "
        f"{'EMA' if meta['weights'] == 'ema' else 'Model'} weights of `{meta['source_checkpoint']}` "
        f"(after {meta['global_step']} optimizer steps).", "",
        f"- classes ({meta['num_classes']}): {cls} (also `config.id2label`)",
        f"- reloaded with transformers at export: largest logit difference {meta['verified_max_abs_diff']:.2e}",
        "", "## Loading", "", "```python", snippet.rstrip(), "```", "",
    ])


@torch.no_grad()
def _verify(out: Path, model: SCHaNeModel, img_size: int) -> float:
    """Load the export with transformers alone and compare its logits with schane's on a random batch."""
    import inspect

    from transformers import AutoModelForImageClassification


    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    want = model.classifier(model.forward_features(x))
    with quiet_progress():
        m = AutoModelForImageClassification.from_pretrained(str(out), local_files_only=True).eval()
    kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(m.forward).parameters else {}
    got = m(pixel_values=x, **kwargs).logits
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not diff <= 1e-4 * (1.0 + float(want.abs().max())):
        raise ValueError(f"the exported {type(m).__name__} does not reproduce schane's logits when loaded with "
                         f"transformers (largest difference {diff:.3g}); it was not kept")
    return diff
