"""Has the backbone already seen the few-shot classes? The pretraining-overlap check.

A few-shot number measures transfer to *new* classes only when the novel classes are new to the
backbone. The 20 miniImageNet and 160 tieredImageNet test classes are ImageNet-1k classes, so a
backbone pretrained on ImageNet-1k (or 21k) labels has learnt to recognise them. For classes named by
WordNet ids (``n01930112``: miniImageNet, tieredImageNet, ImageNet class folders, your own data named
that way) this module counts how many validation and novel classes are in the backbone's pretraining
label set. The label sets are the class lists timm ships (``timm/data/_info/imagenet_synsets.txt``,
``imagenet12k_synsets.txt``, ``imagenet21k_goog_synsets.txt``, ``imagenet22k_synsets.txt``,
``imagenet21k_miil_synsets.txt``); which one applies is read from the backbone's timm pretrained tag
(``resnet50.a1_in1k``: ImageNet-1k; ``vit_base_patch16_224.augreg_in21k_ft_in1k``: ImageNet-21k then 1k;
without a tag, timm's default tag), else from the number of classes of its pretrained head.
Self-supervised weights (``.mae``, ``.dino``, ``.fcmae``, DINOv2's ``.lvd142m``, the official BEiT-3
checkpoints) saw the classes' *images* without their labels: the check counts them too and says so.

:func:`schane.pipelines.fewshot.check_fewshot_classes` is what ``schane fewshot`` runs before any training:
it checks that the validation and novel classes can hold the episodes, writes your own data's resolved class
lists, and logs the overlap computed here.

Examples:
    >>> from schane.data.base import read_split_lines
    >>> classes = {"val_classes": read_split_lines("mini_imagenet", "val.txt"),
    ...            "test_classes": read_split_lines("mini_imagenet", "test.txt")}
    >>> report = pretraining_overlap("resnet50.a1_in1k", classes)
    >>> report["splits"]["test_classes"]["in_pretraining"], report["splits"]["test_classes"]["wordnet_ids"]
    (20, 20)
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schane.models.backbones import BEIT3_CONFIGS
from schane.models.weights import EFFNET_LITE0_OFFLINE

logger = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")
"""A WordNet noun id as ImageNet names its classes."""

LABEL_SET_FILES: dict[str, tuple[str, ...]] = {
    "ImageNet-1k": ("imagenet_synsets.txt",),
    "ImageNet-12k": ("imagenet12k_synsets.txt",),
    "ImageNet-21k": ("imagenet21k_goog_synsets.txt", "imagenet22k_synsets.txt"),
    "ImageNet-21k-P": ("imagenet21k_miil_synsets.txt",),
}
"""Each ImageNet label set and the class-list files of ``timm/data/_info/`` that hold its WordNet ids."""

_TAG_SETS = {"in1k": "ImageNet-1k", "in12k": "ImageNet-12k", "in21k": "ImageNet-21k", "in22k": "ImageNet-21k"}
# tags of data sets that contain ImageNet-21k's images: EVA-02's Merged-38M, DINOv2's LVD-142M
_IMAGE_SOURCES = {"m38m": "ImageNet-21k", "lvd142m": "ImageNet-21k"}
# self-supervised methods whose timm tags name no data set: MAE, DINO, ConvNeXt-V2 FCMAE, I-JEPA (ImageNet-1k)
_SSL_TAGS = {
    "mae": "ImageNet-1k",
    "fcmae": "ImageNet-1k",
    "dino": "ImageNet-1k",
    "ijepa": "ImageNet-1k",
    "mim": None,
}
_NUM_CLASSES = {
    1000: "ImageNet-1k",
    11821: "ImageNet-12k",
    21841: "ImageNet-21k",
    21842: "ImageNet-21k",
    21843: "ImageNet-21k",
    11221: "ImageNet-21k-P",
}
_PARTS = {"val_classes": "validation", "test_classes": "novel"}


@dataclass(frozen=True)
class Pretraining:
    """What a backbone's weights were pretrained on, as far as can be told from its name.

    Attributes:
        sets: ``(label set, labels used)`` pairs: ``("ImageNet-1k", True)`` for supervised training on
            its labels, ``("ImageNet-21k", False)`` for self-supervised training on its images.
        basis: How this was decided (shown in messages).
        random: The backbone starts from random weights (nothing was seen).
    """

    sets: tuple[tuple[str, bool], ...]
    basis: str
    random: bool = False

    @property
    def known(self) -> bool:
        """Whether a label set is known (or the weights are random)."""
        return bool(self.sets) or self.random


def _sets_from_tag(tag: str, miil: bool = False) -> dict[str, bool]:
    """``{label set: labels used}`` of a timm pretrained tag; stages are separated by ``ft`` (fine-tuned).

    ``miil``: the model is one of Alibaba-MIIL's, whose ``in21k`` is their ImageNet-21k-P subset.
    """
    tokens = [t for t in re.split(r"[_\-.]", tag.lower()) if t]
    cut = tokens.index("ft") if "ft" in tokens else len(tokens)
    pre, post = tokens[:cut], tokens[cut:]
    ssl = [t for t in pre if t in _SSL_TAGS]
    sets: dict[str, bool] = {}

    def add(name: str, labelled: bool) -> None:
        sets[name] = sets.get(name, False) or labelled

    for stage, labelled in ((pre, not ssl), (post, True)):
        for t in stage:
            if t in _TAG_SETS:
                add("ImageNet-21k-P" if t == "in21k" and miil else _TAG_SETS[t], labelled)
            elif t in _IMAGE_SOURCES:
                add(_IMAGE_SOURCES[t], False)
    if ssl and not any(t in _TAG_SETS or t in _IMAGE_SOURCES for t in pre):
        for t in ssl:
            ssl_source = _SSL_TAGS[t]
            if ssl_source:
                add(ssl_source, False)
    return sets


def _timm_pretraining(name: str) -> Pretraining:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    tag = name.partition(".")[2] or (getattr(cfg, "tag", None) or "")
    if not tag:
        return Pretraining((), f"timm lists no pretrained weights for {name!r}")
    shown = f"timm pretrained tag {tag!r}" + ("" if "." in name else " (timm's default for the name)")
    sets = _sets_from_tag(tag, miil="miil" in name.lower())
    if sets:
        return Pretraining(tuple(sets.items()), shown)
    n = int(getattr(cfg, "num_classes", 0) or 0)
    if n in _NUM_CLASSES and not any(t in _SSL_TAGS for t in re.split(r"[_\-.]", tag.lower())):
        return Pretraining(((_NUM_CLASSES[n], True),), f"{shown}: a pretrained head of {n} classes")
    return Pretraining((), f"{shown} names no ImageNet label set")


def backbone_pretraining(
    backbone: str, *, pretrained: bool = True, checkpoint: str | None = None
) -> Pretraining:
    """What the weights of a schane backbone (``model.backbone``) were pretrained on.

    Args:
        backbone: ``"effnet-lite0-offline"``, a BEiT-3 name, or a timm name with or without a pretrained tag.
        pretrained: ``model.pretrained``.
        checkpoint: ``model.checkpoint`` (a file: its pretraining is unknown, except for BEiT-3, whose
            official checkpoints are all pretrained on ImageNet-21k images).

    Returns:
        A :class:`Pretraining`; ``sets`` is empty when the data has no known ImageNet label set.
    """

    if backbone in BEIT3_CONFIGS:
        if checkpoint is None:
            return Pretraining((), "BEiT-3 without a checkpoint: random weights", random=True)
        return Pretraining(
            (("ImageNet-21k", False),),
            "BEiT-3 checkpoint: masked data modelling on ImageNet-21k "
            "images, image-text pairs and text (self-supervised)",
        )
    if checkpoint is not None:
        return Pretraining(
            (), f"weights from model.checkpoint {Path(checkpoint).name}: their pretraining is unknown"
        )
    if not pretrained:
        return Pretraining((), "random weights (model.pretrained=false)", random=True)
    if backbone == EFFNET_LITE0_OFFLINE:
        return Pretraining((("ImageNet-1k", True),), "the bundled tf_efficientnet_lite0 ImageNet-1k weights")
    return _timm_pretraining(backbone)


@functools.cache
def label_set(name: str) -> frozenset[str]:
    """The WordNet ids of an ImageNet label set (a key of :data:`LABEL_SET_FILES`), from timm's class lists.

    Raises:
        ValueError: On an unknown label set.
    """
    if name not in LABEL_SET_FILES:
        raise ValueError(f"unknown label set {name!r}; choose one of {', '.join(LABEL_SET_FILES)}")
    info = importlib.resources.files("timm.data").joinpath("_info")
    ids: set[str] = set()
    for file in LABEL_SET_FILES[name]:
        ids.update(line.strip() for line in info.joinpath(file).read_text(encoding="utf-8").splitlines())
    ids.discard("")
    return frozenset(ids)


@functools.lru_cache(maxsize=1)
def _lemmas() -> dict[str, str]:
    text = (
        importlib.resources.files("timm.data")
        .joinpath("_info", "imagenet_synset_to_lemma.txt")
        .read_text("utf-8")
    )
    return {
        w: lemma.split(",")[0].strip() for w, _, lemma in (line.partition("\t") for line in text.splitlines())
    }


def _named(wnid: str) -> str:
    lemma = _lemmas().get(wnid)
    return f"{wnid} ({lemma})" if lemma else wnid


def pretraining_overlap(
    backbone: str,
    classes: Mapping[str, Sequence[str]],
    *,
    pretrained: bool = True,
    checkpoint: str | None = None,
    dataset: str = "the data",
    n_examples: int = 3,
) -> dict[str, Any]:
    """Count the classes of each split that are in the backbone's pretraining label set.

    Args:
        backbone: ``model.backbone``.
        classes: ``{split: class names}``, e.g. ``{"val_classes": [...], "test_classes": [...]}``.
        pretrained: ``model.pretrained``.
        checkpoint: ``model.checkpoint``.
        dataset: The data's name, for the message.
        n_examples: Class names shown per split.

    Returns:
        A JSON-safe dict: ``backbone``, ``basis`` (how the pretraining data was decided), ``pretraining``
        (``[{"label_set", "labels_used", "classes"}]``), ``status`` (``"overlap"``, ``"no_overlap"``,
        ``"not_wordnet"``: no class is named by a WordNet id, ``"unknown"``: no known label set,
        ``"random"``: random weights), ``splits`` (``{split: {"classes", "wordnet_ids", "in_pretraining",
        "examples"}}``, ``in_pretraining`` is ``None`` when not counted) and ``message`` (one line).
    """
    pre = backbone_pretraining(backbone, pretrained=pretrained, checkpoint=checkpoint)
    seen = frozenset().union(*(label_set(name) for name, _ in pre.sets))
    splits: dict[str, dict[str, Any]] = {}
    for split, names in classes.items():
        wnids = [c for c in names if WNID.match(c)]
        hits = [c for c in wnids if c in seen]
        splits[split] = {
            "classes": len(names),
            "wordnet_ids": len(wnids),
            "in_pretraining": len(hits) if pre.sets and wnids else None,
            "examples": [_named(c) for c in hits[:n_examples]],
        }
    if pre.random:
        status = "random"
    elif not pre.sets:
        status = "unknown"
    elif not any(s["wordnet_ids"] for s in splits.values()):
        status = "not_wordnet"
    else:
        status = "overlap" if any(s["in_pretraining"] for s in splits.values()) else "no_overlap"
    report = {
        "backbone": backbone,
        "basis": pre.basis,
        "pretraining": [
            {"label_set": n, "labels_used": used, "classes": len(label_set(n))} for n, used in pre.sets
        ],
        "status": status,
        "splits": splits,
    }
    report["message"] = overlap_message(report, dataset)
    return report


def _sets_text(report: Mapping[str, Any]) -> str:
    """``ImageNet-21k and ImageNet-1k``; self-supervised sets are marked ``(images only)`` when labels were
    also used."""
    sets = report["pretraining"]
    mixed = len({p["labels_used"] for p in sets}) > 1
    return " + ".join(
        p["label_set"] + (" (images only)" if mixed and not p["labels_used"] else "") for p in sets
    )


def overlap_message(report: Mapping[str, Any], dataset: str = "the data") -> str:
    """The one-line summary of a :func:`pretraining_overlap` report."""
    who, status, basis = report["backbone"], report["status"], report["basis"]
    if status == "random":
        return f"pretraining overlap: none, {who} starts from {basis}"
    if status == "unknown":
        return f"pretraining overlap not checked: {basis}"
    sets = _sets_text(report)
    images_only = not any(p["labels_used"] for p in report["pretraining"])
    if status == "not_wordnet":
        head = (
            f"the pretraining images of {who} include {sets}, and so maybe the classes of {dataset}"
            if images_only
            else f"{who} was pretrained on the {sets} classes"
        )
        return (
            f"pretraining overlap: {head}; the class names of {dataset} are not WordNet ids, so the overlap "
            f"cannot be counted ({basis})"
        )
    splits = report["splits"]
    counts = " and ".join(
        f"{s['in_pretraining']}/{s['wordnet_ids']} {_PARTS.get(k, k)} ({k})"
        for k, s in splits.items()
        if s["in_pretraining"] is not None
    )
    if status == "no_overlap":
        return f"pretraining overlap: {counts} classes of {dataset} are {sets} classes ({basis})"
    order = sorted(splits, key=lambda k: k != "test_classes")  # novel classes first
    examples = [e for k in order for e in splits[k]["examples"]][:4]
    seen = (
        f"whose images {who} saw in self-supervised pretraining"
        if images_only
        else f"seen by {who} in pretraining"
    )
    return (
        f"pretraining overlap: {counts} classes of {dataset} are {sets} classes, {seen} ({basis}; e.g. "
        f"{', '.join(examples)}): few-shot accuracy on them measures recognition of seen classes, not transfer "
        "to new ones"
    )
