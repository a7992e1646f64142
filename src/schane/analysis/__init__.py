"""Embedding analysis: metrics (:mod:`.metrics`), pictures (:mod:`.plots`) and reports (:mod:`.report`).

The metrics are re-exported here; ``schane.analysis.plots`` and ``schane.analysis.report``
are imported on demand (they pull in matplotlib and the training engine).
"""

from schane.analysis.metrics import (
    ClassSimilarity,
    alignment,
    class_similarity_gap,
    isoscore,
    isotropy,
    knn_accuracy,
    silhouette,
    uniformity,
)

__all__ = [
    "ClassSimilarity",
    "alignment",
    "class_similarity_gap",
    "isoscore",
    "isotropy",
    "knn_accuracy",
    "silhouette",
    "uniformity",
]
