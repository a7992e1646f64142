"""N-way K-shot episode sampling and a JSON format for episode lists.

An *episode* draws ``ways`` classes from a split, then ``shots`` support and ``queries``
query images from each drawn class, without overlap. Labels are remapped to ``0..ways-1``
in the order the classes were drawn. Every method of a comparison is evaluated on the same
list of episodes, which is written to JSON with enough metadata (split name, number of
images, a hash of the labels) to refuse a file that belongs to another dataset.

Examples:
    >>> eps = sample_episodes([0, 0, 1, 1, 2, 2], ways=2, shots=1, queries=1, n_episodes=3, seed=0)
    >>> len(eps), eps[0].support_labels, eps[0].query_labels
    (3, [0, 1], [0, 1])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode; indices refer to the split's dataset.

    Support and query lists are class-major: the first ``shots`` support entries belong to
    remapped class 0, the next ``shots`` to class 1, and so on (likewise for queries).

    Attributes:
        support: dataset indices of the support images, length ``ways * shots``.
        query: dataset indices of the query images, length ``ways * queries``.
        support_labels: remapped labels (0..ways-1) of ``support``.
        query_labels: remapped labels (0..ways-1) of ``query``.
        classes: the split's original label of each remapped class (``classes[j]`` is class ``j``).
    """

    support: list[int]
    query: list[int]
    support_labels: list[int]
    query_labels: list[int]
    classes: list[int]

    @property
    def ways(self) -> int:
        return len(self.classes)

    @property
    def shots(self) -> int:
        return len(self.support) // max(len(self.classes), 1)

    @property
    def queries(self) -> int:
        return len(self.query) // max(len(self.classes), 1)


def labels_hash(labels: Sequence[int] | np.ndarray) -> str:
    """SHA-256 (hex, first 16 characters) of the labels as little-endian int64."""
    arr = np.asarray(labels, dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def _as_label_array(labels: Sequence[int] | np.ndarray | Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def sample_episodes(
    labels: Sequence[int] | np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    n_episodes: int,
    seed: int,
) -> list[Episode]:
    """Draw ``n_episodes`` N-way K-shot episodes with disjoint support and query sets.

    Episode ``i`` depends only on ``(seed, i)`` and the labels, so the first 600 episodes of
    a 2,000-episode list equal a 600-episode list with the same seed.

    Args:
        labels: ``[M]`` integer label of every image of the split (e.g. ``dataset.targets``).
        ways: classes per episode (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        n_episodes: number of episodes.
        seed: random seed.

    Returns:
        A list of :class:`Episode`.

    Raises:
        ValueError: when an argument is out of range, the split has fewer than ``ways``
            classes, or some class has fewer than ``shots + queries`` images.
    """
    for name, v, lo in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 1), ("n_episodes", n_episodes, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    arr = _as_label_array(labels)
    classes, counts = np.unique(arr, return_counts=True)
    if len(classes) < ways:
        raise ValueError(
            f"cannot draw {ways}-way episodes: the split has only {len(classes)} classes; "
            f"lower fewshot.ways to at most {len(classes)}"
        )
    need = shots + queries
    short = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True) if n < need]
    if short:
        listing = ", ".join(f"class {c}: {n}" for c, n in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise ValueError(
            f"{shots}-shot episodes with {queries} queries need {need} images per class, but "
            f"{len(short)} class(es) have fewer ({listing}{more}); lower fewshot.queries or the shots"
        )
    by_class = {int(c): np.flatnonzero(arr == c) for c in classes}
    episodes = []
    for i in range(n_episodes):
        rng = np.random.default_rng([int(seed), i])
        chosen = rng.choice(classes, size=ways, replace=False)
        support: list[int] = []
        query: list[int] = []
        for c in chosen:
            picked = rng.choice(by_class[int(c)], size=need, replace=False)
            support.extend(int(x) for x in picked[:shots])
            query.extend(int(x) for x in picked[shots:])
        episodes.append(
            Episode(
                support=support,
                query=query,
                support_labels=[j for j in range(ways) for _ in range(shots)],
                query_labels=[j for j in range(ways) for _ in range(queries)],
                classes=[int(c) for c in chosen],
            )
        )
    return episodes


def save_episodes(
    path: str | Path,
    episodes: Sequence[Episode],
    labels: Sequence[int] | np.ndarray,
    split: str,
    *,
    seed: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an episode list and the metadata that identifies its dataset split to JSON.

    Args:
        path: output file (parent directories are created).
        episodes: the episodes (all with the same ways/shots/queries).
        labels: ``[M]`` labels of the split the episodes index into.
        split: the split's name (e.g. ``"test_classes"``).
        seed: the sampling seed, recorded for reference.
        extra: further JSON-safe metadata (e.g. the dataset name).

    Returns:
        The path written.

    Raises:
        ValueError: when the list is empty, mixes episode shapes, or indexes past the split.
    """
    if not episodes:
        raise ValueError("save_episodes needs at least one episode")
    shapes = {(e.ways, e.shots, e.queries) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"all episodes must share ways/shots/queries, got {sorted(shapes)}")
    arr = _as_label_array(labels)
    top = max(max(e.support + e.query) for e in episodes)
    if top >= len(arr):
        raise ValueError(f"episode index {top} is out of range for a split of {len(arr)} images")
    ways, shots, queries = shapes.pop()
    doc = {
        "format": "schane-episodes",
        "version": FORMAT_VERSION,
        "split": split,
        "num_images": int(len(arr)),
        "labels_sha256": labels_hash(arr),
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "seed": seed,
        "extra": extra or {},
        "episodes": [asdict(e) for e in episodes],
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, separators=(",", ":")))
    return p


def read_episodes_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of an episode file (everything but the episodes).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not an episode file written by :func:`save_episodes`.
    """
    doc = _read(path)
    return {k: v for k, v in doc.items() if k != "episodes"}


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"episode file {p} not found; write one with save_episodes or 'schane fewshot'")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"episode file {p} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != "schane-episodes":
        raise ValueError(f"{p} is not a schane episode file (missing format: schane-episodes)")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{p} has episode format version {doc.get('version')}, expected {FORMAT_VERSION}")
    return doc


def load_episodes(
    path: str | Path,
    labels: Sequence[int] | np.ndarray | None = None,
    split: str | None = None,
) -> list[Episode]:
    """Read an episode list written by :func:`save_episodes`, checking it fits the dataset.

    Args:
        path: the JSON file.
        labels: ``[M]`` labels of the split to be indexed; when given, the image count and
            the label hash must match the file's.
        split: the expected split name; when given, it must match the file's.

    Returns:
        The episodes, equal to the ones saved.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is malformed or does not match ``labels``/``split``.
    """
    doc = _read(path)
    if split is not None and doc["split"] != split:
        raise ValueError(f"episode file {path} was drawn from split {doc['split']!r}, not {split!r}")
    if labels is not None:
        arr = _as_label_array(labels)
        if len(arr) != doc["num_images"]:
            raise ValueError(
                f"episode file {path} expects {doc['num_images']} images in split {doc['split']!r}, "
                f"the dataset has {len(arr)}; the dataset or its split changed, sample new episodes"
            )
        if labels_hash(arr) != doc["labels_sha256"]:
            raise ValueError(
                f"episode file {path} does not match the dataset's labels (hash differs); "
                "the dataset or its split changed, sample new episodes"
            )
    try:
        return [
            Episode(
                support=[int(x) for x in e["support"]],
                query=[int(x) for x in e["query"]],
                support_labels=[int(x) for x in e["support_labels"]],
                query_labels=[int(x) for x in e["query_labels"]],
                classes=[int(x) for x in e["classes"]],
            )
            for e in doc["episodes"]
        ]
    except (KeyError, TypeError) as e:
        raise ValueError(f"episode file {path} has a malformed episode entry: {e!r}") from None
