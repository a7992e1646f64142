"""``schane export``: a trained checkpoint as files that load without schane (timm, or torchscale for BEiT-3).

``OUT_DIR`` receives:

* ``model.safetensors``: the backbone's weights, the ones the run evaluated (the EMA weights when it selected
  with EMA; :func:`schane.engine.checkpoint.evaluation_weights`). timm backbones keep timm's own key names, so
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=C),
  num_classes=C)`` loads the file. With ``heads=True`` the SCHaNe classifier (a Linear on the pooled feature)
  is stored under the key of the timm model's own classifier (``pretrained_cfg['classifier']`` /
  ``get_classifier()``: ``head.fc`` for ConvNeXt, ``classifier`` for EfficientNet, ``head`` for ViT). BEiT-3
  keeps the official layout: ``beit3.*`` (torchscale's ``BEiT3`` module, vision branch), ``fc_norm.*`` (the
  LayerNorm of the mean-pooled patch tokens) and, with the heads, ``head.*``.
* ``heads.safetensors`` (``heads=True``): ``classifier.*`` and ``projector.*`` (Linear(d, d), ReLU,
  Linear(d, p), then L2 normalisation) under schane's names, for plain PyTorch.
* ``config.json``: timm's fields (``architecture``, ``num_classes``, ``num_features``, ``model_args``,
  ``label_names``, ``pretrained_cfg`` with the preprocessing, so that ``timm.create_model("local-dir:OUT_DIR",
  pretrained=True)`` also works) and a ``schane`` section: class names (``null`` for checkpoints of schane < 0.2,
  which did not store them), the resolved preprocessing, the run's config, which weights were exported.
* ``README.md``: a model card with the loading code.

Before anything is kept, the export is loaded back the way a user would load it (timm alone, or torchscale
alone) and its outputs are compared with schane's on a random batch.

Examples:
    >>> result = export_checkpoint("runs/demo/schane-seed0/best.pt", "exported/", heads=True)  # doctest: +SKIP
    >>> print(result.snippet)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from schane.config import Config, to_dict
from schane.engine.checkpoint import evaluation_weights, load_checkpoint
from schane.models.backbones import Beit3Backbone, is_beit3
from schane.models.hf import is_hf
from schane.models.model import SCHaNeModel
from schane.models.weights import EFFNET_LITE0_OFFLINE, EFFNET_LITE0_TIMM_NAME
from schane.pipelines.export_files import (
    CARD_FILE,
    CONFIG_FILE,
    HEADS_FILE,
    MODEL_FILE,
    ExportResult,
    export_preprocessing,
    heads_tensors,
    save_safetensors,
)
from schane.pipelines.export_hf import export_hf
from schane.pipelines.runs import load_for_evaluation

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "schane-export"
EXPORT_VERSION = 1
# The text branch of BEiT-3, dropped by schane's vision-only backbone: the keys a torchscale BEiT3 module
# misses when it loads the file (everything else must load).
BEIT3_TEXT_KEYS = ("text_embed.", ".B.", "encoder.embed_positions.B.")


def export_checkpoint(path: str | Path, out_dir: str | Path, *, heads: bool = False,
                      force: bool = False) -> ExportResult:
    """Export a training checkpoint's evaluated weights, class names, preprocessing and config.

    The export is written and verified in a temporary folder beside ``out_dir``, then put in place: a new or
    empty ``out_dir``, or a previous export (its ``config.json`` is a schane export's and it holds nothing
    else), is replaced whole by renames, so a reader sees the old export or the new one. Any other non-empty
    folder is refused unless ``force``; then the export's four files are replaced in it one by one (each
    atomically) and the folder's other files are left alone.

    Args:
        path: a ``best.pt``/``last.pt`` written by ``schane train``.
        out_dir: the folder to write (created when missing).
        heads: also export the classifier (into ``model.safetensors`` under the backbone's own head key) and
            the projection head (``heads.safetensors``).
        force: write into a non-empty folder that is not a previous export (its files of the same names
            are overwritten).

    Returns:
        An :class:`ExportResult`.

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: on a corrupt or incompatible checkpoint, an unusable output folder, a non-empty folder that
            is not a previous export (without ``force``), or an export that does not reproduce schane's outputs
            when loaded back.
    """
    out = _check_out_dir(out_dir)
    whole = _replaceable(out)
    if not whole and not force:
        raise ValueError(f"--out {out} already holds files that a schane export did not write "
                         f"({_listing(out)}); pass an empty or new folder, or --force to overwrite its "
                         f"{', '.join(EXPORT_FILES)}")
    loaded = load_for_evaluation(path)
    _create(out.parent)
    stage = out.parent / f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir()  # the folder's usual permissions (mkdtemp's would be 0700)
    except OSError as e:
        raise ValueError(f"cannot write beside the export folder {out} ({e.strerror or e}); pass a folder you can "
                         "write") from None
    try:
        result = _export_into(stage, out, path, loaded, heads)
        _install(stage, out, whole=whole)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dataclasses.replace(result, out_dir=out, files=[out / f.name for f in result.files])


EXPORT_FILES = (MODEL_FILE, HEADS_FILE, CONFIG_FILE, CARD_FILE)


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _replaceable(out: Path) -> bool:
    """Whether ``out`` is missing, empty, or a previous export and nothing else (then it is replaced whole)."""
    if not out.is_dir():
        return True
    names = {p.name for p in out.iterdir()}
    if not names:
        return True
    if not names <= set(EXPORT_FILES) or CONFIG_FILE not in names:
        return False
    try:
        marker = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")).get("schane", {}).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return marker == EXPORT_FORMAT


def _install(stage: Path, out: Path, *, whole: bool) -> None:
    """Put the files of ``stage`` in place at ``out`` (see :func:`export_checkpoint`)."""
    if not whole:
        for f in EXPORT_FILES:
            if (stage / f).exists():
                os.replace(stage / f, out / f)
            elif f == HEADS_FILE:
                (out / f).unlink(missing_ok=True)  # from an earlier export with --heads
        return
    if not out.exists():
        os.replace(stage, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=out.parent))
    os.replace(out, old / "x")
    try:
        os.replace(stage, out)
    except OSError:
        os.replace(old / "x", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _export_into(out: Path, final: Path, path: str | Path, loaded: Any, heads: bool) -> ExportResult:
    """Write and verify the export in the folder ``out``, whose files will end up in ``final``."""

    state = load_checkpoint(path)
    which = "ema" if evaluation_weights(state) is not state["model"] else "model"
    model, cfg = loaded.model.cpu().eval(), loaded.cfg
    if loaded.class_names is None:
        logger.warning("%s stores no class names (written by schane < 0.2): the export has none either", path)
    elif len(loaded.class_names) != loaded.num_classes:
        raise ValueError(f"{path} is inconsistent: {len(loaded.class_names)} class names for a classifier of "
                         f"{loaded.num_classes} classes; it is corrupt")

    if is_hf(cfg.model.backbone):  # save_pretrained layout: schane.pipelines.export_hf
        return export_hf(loaded, state, path, out, which=which, heads=heads)
    kind = "beit3" if is_beit3(cfg.model.backbone) else "timm"
    if kind == "beit3":
        tensors, layout, clf_key = _beit3_layout(model, heads)
    else:
        tensors, layout, clf_key = _timm_layout(model, cfg, heads)
    config = _export_config(cfg, model, loaded, kind, layout, which, heads, clf_key, path, state)
    files = [save_safetensors(out / MODEL_FILE, tensors)]
    if heads:
        files.append(save_safetensors(out / HEADS_FILE, heads_tensors(model)))
    diff = _verify(out, config, model, img_size=_verify_size(cfg, model, kind))  # a failure keeps nothing
    config["schane"]["verified_max_abs_diff"] = diff
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    snippet = load_snippet(config, final)
    (out / CARD_FILE).write_text(model_card(config, snippet))
    files += [out / CONFIG_FILE, out / CARD_FILE]
    logger.info("exported %s (%s weights) to %s; reloaded outside schane, largest output difference %.2e",
                cfg.model.backbone, which, final, diff)
    return ExportResult(out, files, kind, which, loaded.num_classes, loaded.class_names, clf_key, diff, snippet)


def _check_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser()
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise ValueError(f"{p} is a file, not a folder: cannot export to {out}; pass another --out")
        if p.exists():
            break
    return out


def _create(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the export folder {out} ({e.strerror or e}); pass a folder you can write") from None


# --------------------------------------------------------------------------- layouts


def timm_model_name(backbone: str) -> str:
    """The timm model a schane backbone name is (``effnet-lite0-offline`` is ``tf_efficientnet_lite0``)."""

    return EFFNET_LITE0_TIMM_NAME if backbone == EFFNET_LITE0_OFFLINE else backbone


def _timm_reference(name: str, num_classes: int, model_args: dict[str, Any]) -> nn.Module:
    """The timm model with a classifier of ``num_classes``, on the meta device where possible (no memory)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
    except Exception:  # a model whose initialisation needs real tensors
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)


def _timm_layout(model: SCHaNeModel, cfg: Config, heads: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                      str | None]:
    """The backbone's tensors under timm's names, with the classifier on the timm model's own head.

    Returns:
        ``(tensors, {"architecture", "model_args", "pretrained_cfg_overlay"}, classifier key or None)``.
    """
    name = timm_model_name(cfg.model.backbone)
    model_args = dict(cfg.model.backbone_kwargs or {})
    tensors = dict(model.backbone.state_dict())
    c = model.num_classes
    ref = _timm_reference(name, c, model_args)
    clf = cast(Any, ref).get_classifier()  # timm's method, not on nn.Module
    clf_name = next((n for n, m in ref.named_modules() if m is clf), None)
    mappable = (isinstance(clf, nn.Linear) and bool(clf_name) and clf.in_features == model.num_features
                and clf.out_features == c)
    clf_key = None
    if heads and mappable:
        clf_key = clf_name
        tensors[f"{clf_name}.weight"] = model.classifier.weight
        tensors[f"{clf_name}.bias"] = model.classifier.bias
    elif heads:
        logger.warning("%s's classifier (%s) is not a single Linear layer on the pooled feature: the SCHaNe "
                       "classifier is exported only to %s (load model.safetensors with num_classes=0)",
                       name, type(clf).__name__, HEADS_FILE)
    from timm.models import get_pretrained_cfg

    registry = get_pretrained_cfg(name)
    overlay: dict[str, Any] = {"num_classes": c if clf_key else 0}
    if registry is not None and registry.custom_load:
        overlay["custom_load"] = False  # our file is a plain state dict (older timm does not reset this itself)
    if registry is not None and registry.label_offset:
        overlay["label_offset"] = 0  # else timm would drop the first rows of our classifier
    return tensors, {"architecture": name, "model_args": model_args, "pretrained_cfg_overlay": overlay}, clf_key


def _beit3_layout(model: SCHaNeModel, heads: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """The official BEiT-3 layout (``beit3.*``, ``fc_norm.*``, ``head.*``) and the torchscale EncoderConfig."""
    bb = model.backbone
    assert isinstance(bb, Beit3Backbone)  # the beit3 layout is only chosen for BEiT-3 backbones
    tensors = dict(bb.state_dict())
    if heads:
        tensors["head.weight"], tensors["head.bias"] = model.classifier.weight, model.classifier.bias
    args = {k: v for k, v in vars(bb.args).items() if isinstance(v, (bool, int, float, str, type(None)))}
    layout = {"architecture": bb.pretrained_cfg["architecture"], "encoder_config": args, "fc_norm_eps": bb.fc_norm.eps}
    return tensors, layout, "head" if heads else None


# --------------------------------------------------------------------------- config.json and the model card


def _timm_data_cfg(pre: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing as timm's pretrained_cfg fields (schane's ``squash`` is timm's ``squash`` at crop 1)."""
    squash = pre["eval_resize"] == "squash"
    return {"input_size": pre["input_size"], "interpolation": pre["interpolation"], "mean": pre["mean"],
            "std": pre["std"], "crop_pct": 1.0 if squash else pre["crop_pct"], "crop_mode": "squash" if squash else "center"}


def _export_config(cfg: Config, model: SCHaNeModel, loaded: Any, kind: str, layout: dict[str, Any], which: str,
                   heads: bool, clf_key: str | None, path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    pre = export_preprocessing(cfg, model)
    names = loaded.class_names
    n_out = loaded.num_classes if clf_key else 0
    pcfg = {**_timm_data_cfg(pre), "num_classes": n_out}
    out: dict[str, Any] = {"architecture": layout["architecture"], "num_classes": n_out,
                           "num_features": model.num_features}
    if kind == "timm":
        out["model_args"] = layout["model_args"]
        pcfg.update({k: v for k, v in layout["pretrained_cfg_overlay"].items() if k != "num_classes"})
        if clf_key:
            pcfg["classifier"] = clf_key
    else:
        out["beit3"] = {"encoder_config": layout["encoder_config"], "fc_norm_eps": layout["fc_norm_eps"],
                        "pooling": "fc_norm(mean of the patch tokens, CLS excluded)"}
    if names is not None and clf_key:
        out["label_names"] = list(names)
    out["pretrained_cfg"] = pcfg
    out["schane"] = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kind": kind, "backbone": cfg.model.backbone,
        "weights": which, "source_checkpoint": str(path), "global_step": state.get("global_step"),
        "best_metric": state.get("best_metric"), "num_classes": loaded.num_classes, "class_names": names,
        "class_names_note": None if names is not None else "the checkpoint stores no class names (schane < 0.2)",
        "classifier_key": clf_key, "proj_dim": model.proj_dim, "heads_file": HEADS_FILE if heads else None,
        "preprocessing": pre, "config": to_dict(cfg),
    }
    return json.loads(json.dumps(out))


def _torchvision_transform(pre: dict[str, Any]) -> str:
    """The evaluation transform as torchvision code (what schane's ``eval_transform`` does)."""
    s, mode = pre["input_size"][1], f"T.InterpolationMode.{pre['interpolation'].upper()}"
    if pre["eval_resize"] == "squash":
        resize = f"T.Resize(({s}, {s}), interpolation={mode})"
    else:
        resize = f"T.Resize({math.floor(s / pre['crop_pct'])}, interpolation={mode}), T.CenterCrop({s})"
    return f"T.Compose([{resize}, T.ToTensor(), T.Normalize({pre['mean']}, {pre['std']})])"


def load_snippet(config: dict[str, Any], out_dir: Path) -> str:
    """Python code that loads an export outside schane (timm alone, or torchscale alone for BEiT-3) and runs it
    on ``'image.jpg'``."""
    sc = config["schane"]
    s, c = sc["preprocessing"]["input_size"][1], config["num_classes"]
    folder = [f"folder = {str(out_dir)!r}  # this export's folder"]
    result = (f"    probs = {{}}.softmax(-1)  # [1, {c}]; class names: cfg['schane']['class_names']" if c
              else f"    features = {{}}  # [1, {config['num_features']}] pooled features")
    if sc["kind"] == "timm":
        overlay = {k: repr(v) for k, v in config["pretrained_cfg"].items()
                   if k in ("num_classes", "custom_load", "label_offset")}
        overlay = {"file": f"f'{{folder}}/{MODEL_FILE}'", **overlay}
        args = "".join(f", {k}={v!r}" for k, v in config.get("model_args", {}).items())
        return "\n".join([
            "import json", "", "import timm", "import torch", "from PIL import Image", "", *folder,
            f"cfg = json.load(open(f'{{folder}}/{CONFIG_FILE}'))",
            "model = timm.create_model(",
            f"    {config['architecture']!r}, pretrained=True, num_classes={c}{args},",
            f"    pretrained_cfg_overlay=dict({', '.join(f'{k}={v}' for k, v in overlay.items())}),",
            ").eval()",
            "transform = timm.data.create_transform(**timm.data.resolve_data_config(cfg['pretrained_cfg']))",
            f"x = transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0)  # [1, 3, {s}, {s}]",
            "with torch.no_grad():", result.format("model(x)"), "",
        ])
    lines = [
        "import json", "", "import torch", "from PIL import Image", "from safetensors.torch import load_file",
        "from torchscale.architecture.config import EncoderConfig", "from torchscale.model.BEiT3 import BEiT3",
        "from torchvision import transforms as T", "", *folder,
        f"cfg = json.load(open(f'{{folder}}/{CONFIG_FILE}'))",
        f"sd = load_file(f'{{folder}}/{MODEL_FILE}')",
        "beit3 = BEiT3(EncoderConfig(**cfg['beit3']['encoder_config'])).eval()",
        "# strict=False: the file has no text branch (text_embed.*, *.B.*), which images never use",
        "beit3.load_state_dict({k[len('beit3.'):]: v for k, v in sd.items() if k.startswith('beit3.')}, strict=False)",
        "fc_norm = torch.nn.LayerNorm(cfg['num_features'], eps=cfg['beit3']['fc_norm_eps'])",
        "fc_norm.load_state_dict({'weight': sd['fc_norm.weight'], 'bias': sd['fc_norm.bias']})",
        f"transform = {_torchvision_transform(sc['preprocessing'])}",
        f"x = transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0)  # [1, 3, {s}, {s}]",
        "with torch.no_grad():",
        "    pooled = fc_norm(beit3(visual_tokens=x)['encoder_out'][:, 1:].mean(dim=1))  # mean of the patch tokens",
    ]
    head = "torch.nn.functional.linear(pooled, sd['head.weight'], sd['head.bias'])" if c else "pooled"
    return "\n".join([*lines, result.format(head), ""])


def model_card(config: dict[str, Any], snippet: str) -> str:
    """The export's README.md."""
    sc = config["schane"]
    pre = sc["preprocessing"]
    names = sc["class_names"]
    cls = (", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")) if names is not None \
        else "not stored in the checkpoint (written by schane < 0.2); labels are indices 0..C-1"
    loss = sc["config"]["loss"]
    resize = (f"resize the short side to floor({pre['input_size'][1]} / {pre['crop_pct']}), centre-crop"
              if pre["eval_resize"] == "crop" else "resize straight to the input size (aspect ratio not kept)")
    files = [f"- `{MODEL_FILE}`: " + ("timm layout" if sc["kind"] == "timm" else "official BEiT-3 layout: `beit3.*` "
             "(torchscale `BEiT3`, vision branch), `fc_norm.*` (LayerNorm of the mean-pooled patch tokens)")
             + (f"; classifier at `{sc['classifier_key']}.*`" if sc["classifier_key"] else "; no classifier")]
    if sc["heads_file"]:
        files.append(f"- `{HEADS_FILE}`: `classifier.*` (Linear on the pooled feature) and `projector.*` "
                     f"(Linear, ReLU, Linear to {sc['proj_dim']}, L2-normalised)")
    files.append(f"- `{CONFIG_FILE}`: preprocessing, class names, the training config (`schane.config`)")
    return "\n".join([
        f"# {sc['backbone']} fine-tuned with schane ({loss['name']}, λ = {loss['lam']})", "",
        f"Exported from `{sc['source_checkpoint']}` (after {sc['global_step']} optimizer steps), "
        f"{'EMA' if sc['weights'] == 'ema' else 'model'} weights (the ones the run evaluated).", "",
        f"- classes ({sc['num_classes']}): {cls}",
        f"- input: {pre['input_size'][1]} x {pre['input_size'][2]} RGB; {resize}, {pre['interpolation']}; "
        f"mean {pre['mean']}, std {pre['std']}",
        f"- reloaded outside schane at export: largest output difference {sc.get('verified_max_abs_diff', 0.0):.2e}",
        "", "## Files", "", *files, "", "## Loading", "", "```python", snippet.rstrip(), "```", "",
        *(["`config.json` follows timm's hub format too: with timm 1.0.31, `timm.create_model('local-dir:FOLDER', "
           "pretrained=True)` also loads this folder.", ""] if sc["kind"] == "timm" else []),
    ])


# --------------------------------------------------------------------------- loading the export back


def _verify_size(cfg: Config, model: SCHaNeModel, kind: str) -> int:
    if kind == "beit3":
        assert isinstance(model.backbone, Beit3Backbone)
        return model.backbone.img_size
    return int(cfg.data.img_size)


@torch.no_grad()
def _verify(out: Path, config: dict[str, Any], model: SCHaNeModel, *, img_size: int) -> float:
    """Load the export the way a user does and compare its outputs with schane's on a random batch.

    Returns:
        The largest absolute difference.

    Raises:
        ValueError: when the export does not load outside schane or its outputs differ from schane's.
    """
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    feats = model.forward_features(x)
    want = model.classifier(feats) if config["schane"]["classifier_key"] else feats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchscale imports a deprecated timm path
        got = (_reload_timm if config["schane"]["kind"] == "timm" else _reload_beit3)(out, config, x)
    diff = float((got - want).abs().max())
    if not diff <= 1e-4 * (1.0 + float(want.abs().max())):
        raise ValueError(f"the exported {config['architecture']} does not reproduce schane's outputs when loaded "
                         f"outside schane (largest difference {diff:.3g}); it was not kept")
    return diff


def _reload_timm(out: Path, config: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    import timm

    overlay = {"file": str(out / MODEL_FILE), **{k: v for k, v in config["pretrained_cfg"].items()
                                                  if k in ("num_classes", "custom_load", "label_offset")}}
    try:
        m = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                              pretrained_cfg_overlay=overlay, **config["model_args"])
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or other shapes
        raise ValueError(f"the backbone's weights do not load into timm's {config['architecture']}, so they cannot "
                         f"be exported for timm: {str(e).splitlines()[0]}") from e
    return m.eval()(x)


def _reload_beit3(out: Path, config: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    sd = load_file(str(out / MODEL_FILE))
    beit3 = BEiT3(EncoderConfig(**config["beit3"]["encoder_config"])).eval()
    res = beit3.load_state_dict({k[len("beit3."):]: v for k, v in sd.items() if k.startswith("beit3.")}, strict=False)
    bad = [k for k in res.missing_keys if not any(t in k for t in BEIT3_TEXT_KEYS)] + list(res.unexpected_keys)
    if bad:
        raise ValueError(f"the exported BEiT-3 weights do not fit torchscale's BEiT3 ({', '.join(bad[:5])})")
    d = config["num_features"]
    fc_norm = nn.LayerNorm(d, eps=config["beit3"]["fc_norm_eps"])
    fc_norm.load_state_dict({"weight": sd["fc_norm.weight"], "bias": sd["fc_norm.bias"]})
    feats = fc_norm(beit3(visual_tokens=x)["encoder_out"][:, 1:].mean(dim=1))
    if "head.weight" not in sd:
        return feats
    return nn.functional.linear(feats, sd["head.weight"], sd["head.bias"])


__all__ = ["ExportResult", "export_checkpoint", "load_snippet", "model_card", "timm_model_name"]
