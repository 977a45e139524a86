"""Same-subject detection on the self-supervision test pairs from any encoder's embeddings (Jamaludin et al. 2017,
section 4.1 and Fig. 6): the L2 distance between the embeddings of a pair's two volumes is the score for "different
subject". Every pretraining method of 3D volumes reports it, so their pretext figures compare."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def pair_distances(emb: np.ndarray, rows: np.ndarray, pairs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``pairs`` (columns ``a``, ``b``, ``positive``) with the ``distance`` between the embeddings ``emb`` of their
    volumes (``emb[i]`` is the volume at ``rows[i]``), and the figures: the ROC AUC of same-subject detection (None
    without both kinds of pairs) and the mean distances of the positive and the negative pairs."""
    # imported here: the GPU benchmark imports the methods on machines without scikit-learn
    from sklearn.metrics import roc_auc_score
    where = {int(r): i for i, r in enumerate(rows)}
    ia = np.array([where[int(r)] for r in pairs.a], dtype=np.int64)
    ib = np.array([where[int(r)] for r in pairs.b], dtype=np.int64)
    distance = np.linalg.norm(emb[ia] - emb[ib], axis=1) if len(pairs) else np.zeros(0)
    positive = pairs.positive.to_numpy(dtype=bool)
    both = positive.any() and (~positive).any()
    figures = {
        "auc": float(roc_auc_score(positive, -distance)) if both else None,
        "mean_distance_positive": float(distance[positive].mean()) if positive.any() else None,
        "mean_distance_negative": float(distance[~positive].mean()) if (~positive).any() else None,
    }
    return pairs.assign(distance=distance), figures
