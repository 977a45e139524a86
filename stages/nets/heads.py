"""Heads trained on frozen features: class-balanced logistic regression and a one-hidden-layer MLP, in NumPy/SciPy.

Both minimise the class-balanced cross-entropy plus an L2 penalty on the weights (not the biases),

    (1/n) sum_i a_i CE_i + (alpha / 2n) ||W||^2,    a_i = n / (K' n_{y_i})  (the K' classes present),

with L-BFGS on the full batch. For the logistic regression alpha = 1/C, which is scikit-learn's
``LogisticRegression(C=C, class_weight="balanced")`` objective divided by ``C n`` (the same solution; tested).

Features are standardised with the training samples' mean and deviation, then expressed in the orthonormal basis of
the training samples' span (all principal axes, nothing dropped). For the logistic regression this is exactly the
same minimiser (the L2-penalised optimum lies in that span; tested against scikit-learn) in far fewer dimensions
when there are fewer samples than features (a few hundred discs, 2 x 1024 features). For the MLP it is a choice:
its first layer reads the span only (the penalised optimum also has no weight outside it), but the non-convex fit
and its random start differ from a fit in the full space.

They are written here rather than taken from scikit-learn because a probe job runs once per (model, task, subset,
seed) and scikit-learn's import and its solvers on 2,048 features took most of a job's time (over 20 s a job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-sample weights a_i = n / (K' n_{y_i}) over the K' classes present (they sum to n)."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    per_class = np.zeros(n_classes)
    per_class[present] = len(y) / (present.sum() * counts[present])
    return per_class[y]


@dataclass
class Standardiser:
    """Standardise, then project onto the training samples' principal axes (a rotation, nothing dropped)."""

    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        x = np.asarray(x, dtype=np.float64)
        mean, scale = x.mean(0), x.std(0)
        scale[scale < 1e-12] = 1.0
        z = (x - mean) / scale
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        keep = s > 1e-9 * max(s[0] if len(s) else 0.0, 1e-300)
        return cls(mean, scale, vt[keep].T)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.basis


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class _Net:
    """Parameters packed in one vector: a linear layer (hidden = 0) or one hidden ReLU layer."""

    def __init__(self, d: int, hidden: int, k: int):
        self.shapes = [(d, k), (k,)] if hidden == 0 else [(d, hidden), (hidden,), (hidden, k), (k,)]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def unpack(self, theta: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(theta[start:start + size].reshape(shape))
            start += size
        return out

    def init(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        parts = []
        for shape in self.shapes:
            if len(shape) == 2 and len(self.shapes) == 4:     # Glorot-uniform weights, zero biases
                bound = np.sqrt(6 / (shape[0] + shape[1]))
                parts.append(rng.uniform(-bound, bound, size=shape).ravel())
            else:
                parts.append(np.zeros(int(np.prod(shape))))
        return np.concatenate(parts)

    def forward(self, theta: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        p = self.unpack(theta)
        if len(p) == 2:
            return x @ p[0] + p[1], None
        h = np.maximum(x @ p[0] + p[1], 0.0)
        return h @ p[2] + p[3], h

    def objective(self, theta: np.ndarray, x: np.ndarray, onehot: np.ndarray, a: np.ndarray,
                  alpha: float) -> tuple[float, np.ndarray]:
        n = len(x)
        p = self.unpack(theta)
        logits, h = self.forward(theta, x)
        prob = _softmax(logits)
        loss = -(a * np.log(np.clip((prob * onehot).sum(1), 1e-300, None))).sum() / n
        weights = p[0::2]
        loss += alpha / (2 * n) * sum(float((w * w).sum()) for w in weights)
        dz = (prob - onehot) * a[:, None] / n
        if h is None:
            grads = [x.T @ dz + alpha / n * p[0], dz.sum(0)]
        else:
            dh = (dz @ p[2].T) * (h > 0)
            grads = [x.T @ dh + alpha / n * p[0], dh.sum(0), h.T @ dz + alpha / n * p[2], dz.sum(0)]
        return loss, np.concatenate([g.ravel() for g in grads])


@dataclass
class Head:
    """A fitted head. It is fitted over the classes present in its training labels only (an absent class has no
    finite optimum: its bias would drift to minus infinity); ``predict_proba`` gives those classes probability 0."""

    standardiser: Standardiser
    net: _Net
    theta: np.ndarray
    present: np.ndarray      # class indices the head was fitted on
    n_classes: int
    converged: bool

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with threadpool_limits(1):
            proba = _softmax(self.net.forward(self.theta, self.standardiser(x))[0])
        out = np.zeros((len(proba), self.n_classes))
        out[:, self.present] = proba
        return out

    def layers(self) -> list[np.ndarray]:
        """The network's weights and biases, ``[W1, b1]`` (linear) or ``[W1, b1, W2, b2]`` (MLP; ReLU between),
        acting on ``standardiser(x)``; its outputs are the logits of the classes in ``present``."""
        return self.net.unpack(self.theta)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Everything needed to rebuild the head, as named arrays (for ``np.savez``)."""
        s = self.standardiser
        return {f"{prefix}/{k}": np.asarray(v) for k, v in (
            ("mean", s.mean), ("scale", s.scale), ("basis", s.basis), ("theta", self.theta),
            ("present", self.present), ("n_classes", self.n_classes), ("hidden", self.net.shapes[0][1]
                                                                        if len(self.net.shapes) == 4 else 0),
            ("converged", self.converged))}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> Head:
        """The head written by :meth:`to_arrays` (``arrays``: a mapping such as an ``np.load`` of the ``.npz``)."""
        if f"{prefix}/theta" not in arrays:
            raise KeyError(f"no head {prefix!r} in the saved model (heads there: "
                           f"{sorted({k.split('/')[0] for k in arrays.keys()})})")
        get = lambda k: np.asarray(arrays[f"{prefix}/{k}"])  # noqa: E731
        std = Standardiser(get("mean"), get("scale"), get("basis"))
        present = get("present")
        return cls(std, _Net(std.basis.shape[1], int(get("hidden")), len(present)), get("theta"), present,
                   int(get("n_classes")), bool(get("converged")))


def fit_head(x: np.ndarray, y: np.ndarray, n_classes: int, alpha: float, hidden: int = 0, seed: int = 0,
             max_iter: int = 500, standardiser: Standardiser | None = None, start: np.ndarray | None = None) -> Head:
    """Fit a logistic regression (``hidden`` = 0, ``alpha`` = 1/C) or an MLP on ``x`` with class indices ``y``
    (at least two classes present); ``standardiser`` (fitted on ``x``) and ``start`` (parameters of a fit with the
    same classes, e.g. at a nearby ``alpha``) save time."""
    y = np.asarray(y, dtype=np.int64)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"a head needs two or more classes in its training labels, got {present.tolist()}")
    compact = np.searchsorted(present, y)
    with threadpool_limits(1):   # small matrices: a second BLAS thread made each step ~15x slower (measured)
        std = standardiser or Standardiser.fit(x)
        z = std(x)
        net = _Net(z.shape[1], hidden, len(present))
        onehot = np.eye(len(present))[compact]
        a = balanced_weights(compact, len(present))
        result = minimize(net.objective, net.init(seed) if start is None else start, args=(z, onehot, a, alpha),
                          jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": 1e-6})
    return Head(std, net, result.x, present, n_classes, bool(result.success))


def grouped_folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` folds of sample indices, whole groups (subjects) per fold, groups dealt in a seeded random order."""
    names = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[i]: j % k for j, i in enumerate(order)}
    labels = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(labels == j) for j in range(k)]
