"""The public surface of schane.losses stays put: signatures, defaults, reprs, the shared base class, and the
reference module kept out of the fast path."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import schane.losses as losses
from schane.losses import (
    HardNegativeNTXentLoss,
    NTXentLoss,
    PairwiseContrastiveLoss,
    SCHaNeLoss,
    SupConLoss,
    build_contrastive_loss,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "schane"

_T, _OT = "'torch.Tensor'", "'torch.Tensor | None'"
_FWD = (
    f"(self, embeddings: {_T}, labels: {_T}, ref_embeddings: {_OT} = None, ref_labels: {_OT} = None) -> {_T}"
)
_FWD_IDS = f"(self, embeddings: {_T}, labels: {_OT} = None, ref_embeddings: {_OT} = None, ref_labels: {_OT} = None) -> {_T}"
_COMMON = (
    "normalize: 'bool' = True, gather_distributed: 'bool' = False, chunk_size: 'int | None' = None, "
    "backend: 'str | None' = None"
)
_SCHANE = (
    "temperature: 'float' = 0.5, beta: 'float' = 1.0, positive_mode: 'str' = 'mean', normalize: 'bool' = True, "
    "detach_weights: 'bool' = False, gather_distributed: 'bool' = False, chunk_size: 'int | None' = None, "
    "backend: 'str | None' = None"
)
_HCL = f"temperature: 'float' = 0.5, beta: 'float' = 1.0, tau_plus: 'float' = 0.1, {_COMMON}"
_ARGS = f"embeddings: {_T}, labels: {_T}, ref_embeddings: {_OT} = None, ref_labels: {_OT} = None"
_ARGS_IDS = f"embeddings: {_T}, labels: {_OT} = None, ref_embeddings: {_OT} = None, ref_labels: {_OT} = None"

SIGNATURES = {  # name: (the public callable, its signature as of the base-class refactor)
    "SCHaNeLoss.__init__": (SCHaNeLoss.__init__, f"(self, {_SCHANE}) -> 'None'"),
    "SupConLoss.__init__": (SupConLoss.__init__, f"(self, temperature: 'float' = 0.1, {_COMMON}) -> 'None'"),
    "NTXentLoss.__init__": (NTXentLoss.__init__, f"(self, temperature: 'float' = 0.5, {_COMMON}) -> 'None'"),
    "HardNegativeNTXentLoss.__init__": (HardNegativeNTXentLoss.__init__, f"(self, {_HCL}) -> 'None'"),
    "SCHaNeLoss.forward": (SCHaNeLoss.forward, _FWD),
    "SupConLoss.forward": (SupConLoss.forward, _FWD),
    "NTXentLoss.forward": (NTXentLoss.forward, _FWD_IDS),
    "HardNegativeNTXentLoss.forward": (HardNegativeNTXentLoss.forward, _FWD_IDS),
    "schane_loss": (losses.schane_loss, f"({_ARGS}, *, {_SCHANE}) -> {_T}"),
    "supcon_loss": (losses.supcon_loss, f"({_ARGS}, *, temperature: 'float' = 0.1, {_COMMON}) -> {_T}"),
    "ntxent_loss": (losses.ntxent_loss, f"({_ARGS_IDS}, *, temperature: 'float' = 0.5, {_COMMON}) -> {_T}"),
    "hard_negative_ntxent_loss": (losses.hard_negative_ntxent_loss, f"({_ARGS_IDS}, *, {_HCL}) -> {_T}"),
    "JointLoss.__init__": (
        losses.JointLoss.__init__,
        "(self, contrastive: 'nn.Module | None', lam: 'float' = 0.9, "
        "label_smoothing: 'float' = 0.0) -> 'None'",
    ),
    "JointLoss.forward": (
        losses.JointLoss.forward,
        f"(self, logits: {_T}, labels: {_T}, embeddings: {_OT} = None, "
        f"contrastive_labels: {_OT} = None, ref_embeddings: {_OT} = None, ref_labels: {_OT} = None) "
        "-> 'JointLossOutput'",
    ),
    "build_contrastive_loss": (
        build_contrastive_loss,
        "(name: 'str', *, temperature: 'float | None' = None, beta: 'float' = 1.0, "
        "positive_mode: 'str' = 'mean', tau_plus: 'float' = 0.1, gather_distributed: 'bool' = False, "
        "chunk_size: 'int | None' = None, normalize: 'bool' = True, detach_weights: 'bool' = False, "
        "backend: 'str | None' = None) -> 'nn.Module'",
    ),
    "two_view_ids": (
        losses.two_view_ids,
        "(n: 'int', device: 'torch.device | None' = None) -> 'torch.Tensor'",
    ),
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_public_signatures_are_pinned(name):
    fn, want = SIGNATURES[name]
    assert str(inspect.signature(fn)) == want


def test_reprs_and_supervised_flags():
    reprs = {
        "schane": "SCHaNeLoss(temperature=0.5, beta=1.0, positive_mode='mean', normalize=True, "
        "gather_distributed=False, chunk_size=3)",
        "supcon": "SupConLoss(temperature=0.1, normalize=True, chunk_size=3)",
        "simclr": "NTXentLoss()",
        "hcl": "HardNegativeNTXentLoss()",
    }
    for name, want in reprs.items():
        loss = build_contrastive_loss(name, chunk_size=3)
        assert repr(loss) == want
        assert isinstance(loss, PairwiseContrastiveLoss)
        assert loss.supervised == (name in ("schane", "supcon"))
    assert repr(SCHaNeLoss(temperature=2, positive_mode="each")).startswith(
        "SCHaNeLoss(temperature=2.0, beta=1.0, positive_mode='each'"
    )


def test_settings_are_checked_and_held_by_the_base_class():
    loss = HardNegativeNTXentLoss(
        temperature=1, beta=2, tau_plus=0, normalize=0, chunk_size=5, backend="eager"
    )
    assert (loss.temperature, loss.beta, loss.tau_plus, loss.normalize) == (1.0, 2.0, 0.0, False)
    assert (loss.gather_distributed, loss.chunk_size, loss.backend) == (False, 5, "eager")
    assert type(loss.temperature) is float and type(loss.beta) is float
    with pytest.raises(NotImplementedError):
        PairwiseContrastiveLoss(0.5).row_kernel(None)


def _schane_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = SRC in path.parents
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1]) if inside else ""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_reference_module_is_not_imported_by_the_library():
    """schane.losses.reference is for tests and readers; no module under src/schane imports it."""
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "reference.py" and "schane.losses.reference" in _schane_imports(path)
    ]
    assert offenders == []
    assert "schane.losses.reference" in _schane_imports(
        Path(__file__).with_name("test_losses.py")
    )  # it sees one
    assert "schane.losses.base" in _schane_imports(SRC / "losses" / "schane.py")  # and relative imports
