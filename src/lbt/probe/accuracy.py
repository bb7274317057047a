"""Held-out accuracy of the per-layer probes, the slow part of computing directions (`lbt.probe.directions`).

A model's directions fit 3 summaries x every layer x 5 folds of logistic regression: 540 fits for
Qwen2.5-3B, about 20 s of a sweep's first job on an H100 host, one after another (benchmarks/RESULTS.md,
"Issue 15, 2026-12-06 late"). They are independent, so
`probe_accuracies` spreads them over the job's CPUs. Every fit uses one BLAS thread, on a worker or not, so
an accuracy (and so ℓ*) is the same number however many CPUs the node has. This module imports no torch:
the workers start with numpy and scikit-learn only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

# Below this many features per fit (the tiny test model's layers) the fits take milliseconds, and starting
# worker processes would cost more than it saves.
PARALLEL_MIN_FEATURES = 256
MAX_WORKERS = 32


def probe_accuracy(x: np.ndarray, y: np.ndarray, groups: Sequence[str], folds: int = 5) -> float:
    """Held-out accuracy of a standardised L2 logistic regression, folds grouped by scenario."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    groups = np.asarray(groups)
    n_splits = min(folds, len(set(groups.tolist())))
    if n_splits < 2:
        return float("nan")
    correct = 0
    with threadpool_limits(1):
        for train, test in GroupKFold(n_splits=n_splits).split(x, y, groups):
            if len(set(y[train].tolist())) < 2:  # one class only: predict it
                correct += int((y[test] == y[train][0]).sum())
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            clf.fit(x[train], y[train])
            correct += int((clf.predict(x[test]) == y[test]).sum())
    return correct / len(y)


def available_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's allocation, not the node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def probe_accuracies(features: Sequence[np.ndarray], y: np.ndarray, groups: Sequence[str], folds: int = 5,
                     workers: int | None = None) -> list[float]:
    """`probe_accuracy` of each feature matrix (the same labels and groups), in order. With more than one
    worker (default: the CPUs available, at most MAX_WORKERS) and at least PARALLEL_MIN_FEATURES features,
    the fits run on worker processes (joblib's loky: fresh interpreters, safe beside CUDA), which exit a few
    seconds after the last fit."""
    features = list(features)
    workers = min(workers or available_cpus(), MAX_WORKERS, len(features))
    if workers < 2 or features[0].shape[1] < PARALLEL_MIN_FEATURES:
        return [probe_accuracy(x, y, groups, folds) for x in features]
    from joblib import Parallel, delayed

    run = Parallel(n_jobs=workers, backend="loky", inner_max_num_threads=1, idle_worker_timeout=5)
    return list(run(delayed(probe_accuracy)(x, y, groups, folds) for x in features))
