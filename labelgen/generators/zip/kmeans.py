"""Stage 2 clustering: deterministic Lloyd's k-means on feature vectors (torch).

Specification: ``docs/zip-method.md`` (Stage 2, "K-means").

* **[release]** Lloyd's algorithm on raw (un-normalised) vectors, initial centroids at ``k`` evenly
  spaced raster indices ``round(linspace(0, n - 1, k))``, at most ``max_iterations`` updates, stop when
  the centroids change by less than a relative tolerance, an empty cluster keeps its centroid.
* Stopping rule: ``torch.allclose(new, old, rtol=tolerance, atol=0)``, i.e. every coordinate satisfies
  ``|new - old| <= tolerance * |old|``.
* Rounding of the even seeds: numpy's ``rint`` (round half to even, the same rule as ``torch.round``).
* **[ours]** When ``n < k`` the effective ``k`` is ``n`` (every vector its own cluster); the returned
  centroids then have ``n`` rows.
* **[ours]** Determinism: the centroid sums are a one-hot matrix product rather than ``index_add_``,
  whose float atomics on CUDA are not reproducible; counts use ``bincount`` on integers. The same
  input gives bit-identical labels and centroids twice on one device.
* **[ours]** Distances drop the per-row constant ``||x||^2`` (it cannot change the argmin) and rank
  ``||c||^2 - 2 x.c``; this avoids cancellation on large raw feature norms. Ties go to the lowest id.

:func:`kmeans_release` is the ``fidelity: release`` path: the same algorithm with the release's own
arithmetic, so that it returns the release's assignment on the same features (``docs/method.md``,
"Fidelity"): seeds ``torch.round(torch.linspace(0, n - 1, k))`` in float32, distances with
``torch.cdist(p=2)``, each centroid the ``mean`` of its members' rows (an empty cluster keeps its
centroid), the stop rule ``torch.allclose(new, old, rtol=tolerance)`` with torch's default
``atol = 1e-8``, and as labels the assignment of the last iteration (made *before* its update).
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import ValidationError

__all__ = ["kmeans", "kmeans_release", "even_init_indices", "release_init_indices", "semantic_init_indices"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def even_init_indices(num_points: int, k: int) -> np.ndarray:
    """``k`` evenly spaced raster indices ``rint(linspace(0, num_points - 1, k))`` as (k,) int64.

    ``k`` is clamped to ``num_points``; the indices are distinct and ascending.
    """
    if num_points < 1 or k < 1:
        raise ValidationError(f"even_init_indices needs num_points >= 1 and k >= 1, got {num_points}, {k}")
    k = min(k, num_points)
    return np.rint(np.linspace(0.0, num_points - 1.0, k)).astype(np.int64)


def release_init_indices(num_points: int, k: int) -> np.ndarray:
    """The release's seeds: ``unique(round(torch.linspace(0, n - 1, k)))`` computed in float32 on the CPU
    (torch's default dtype), as (<= k,) int64 ascending. ``k`` is clamped to ``num_points``.

    Float32 positions can round to another index than :func:`even_init_indices`'s float64 ones on
    large grids; this is the rule the release's k-means starts from.
    """
    if num_points < 1 or k < 1:
        raise ValidationError(f"release_init_indices needs num_points >= 1 and k >= 1, got {num_points}, {k}")
    positions = torch.linspace(0, num_points - 1, min(k, num_points))
    return torch.unique(torch.round(positions)).to(torch.int64).numpy()


def semantic_init_indices(activation: np.ndarray, k: int) -> np.ndarray:
    """Seeds from an activation map: the paper's "semantic-aware initialisation" (rule is [ours]).

    ``activation``: (h, w) float, larger = more of the class. Returns (min(k, h*w),) int64 raster
    indices into the flattened grid, distinct and ascending. The paper gives no formula; the rule:

    1. "hot" cells are those with activation strictly above the map's mean, sorted by activation
       descending (ties by raster index; a stable sort);
    2. ``min(k // 2, #hot)`` seeds are evenly spaced along that sorted list (``rint(linspace)``), so
       the strongest, middling and weakest hot cells each get seeds;
    3. the remaining seeds are evenly spaced (``rint(linspace)``) over the not-yet-chosen cells in
       raster order, so background regions are covered as with the even initialisation.

    A constant map has no hot cell and gives the even initialisation.
    """
    activation = np.asarray(activation)
    if activation.ndim != 2 or activation.size == 0:
        raise ValidationError(f"activation must be a non-empty (h, w) array, got shape {activation.shape}")
    if not np.issubdtype(activation.dtype, np.number) or not np.all(np.isfinite(activation)):
        raise ValidationError("activation must hold finite numbers; check the class map for NaN/inf")
    if k < 1:
        raise ValidationError(f"k must be >= 1, got {k}")
    flat = activation.astype(np.float64).ravel()
    num_points = flat.size
    k = min(k, num_points)
    hot = np.flatnonzero(flat > flat.mean())
    hot = hot[np.argsort(-flat[hot], kind="stable")]
    num_semantic = min(k // 2, hot.size)
    semantic = hot[even_init_indices(hot.size, num_semantic)] if num_semantic else np.empty(0, np.int64)
    rest = np.setdiff1d(np.arange(num_points), semantic, assume_unique=True)
    num_rest = k - num_semantic
    spread = rest[even_init_indices(rest.size, num_rest)] if num_rest else np.empty(0, np.int64)
    return np.sort(np.concatenate([semantic, spread])).astype(np.int64)


def kmeans(
    features: torch.Tensor,
    k: int,
    max_iterations: int,
    tolerance: float,
    init_indices: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cluster (n, d) feature vectors with Lloyd's algorithm on their own device.

    Args:
        features: (n, d) float tensor; half precision is computed in float32.
        k: number of clusters, >= 1; clamped to ``n`` when ``n < k``.
        max_iterations: most centroid updates, >= 1.
        tolerance: relative stopping tolerance (``rtol`` of ``torch.allclose``, ``atol = 0``), >= 0.
        init_indices: (min(k, n),) distinct row indices of the initial centroids; default evenly
            spaced raster indices (:func:`even_init_indices`).

    Returns:
        ``labels`` (n,) int64 in ``[0, k)``, assigned to the returned centroids; ``centroids``
        (k, d) in the computation dtype; ``iterations``, the number of updates performed.
    """
    features = _check_features(features)
    _check_params(k, max_iterations, tolerance)
    num_points = features.shape[0]
    k = min(k, num_points)
    seeds = _init_indices(init_indices, num_points, k, features.device)
    centroids = features.index_select(0, seeds).clone()
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        labels = _assign(features, centroids)
        updated = _update(features, labels, centroids)
        converged = torch.allclose(updated, centroids, rtol=tolerance, atol=0.0)
        centroids = updated
        if converged:
            break
    return _assign(features, centroids), centroids, iterations


def kmeans_release(
    features: torch.Tensor,
    k: int,
    max_iterations: int = 100,
    tolerance: float = 1e-5,
    init_indices: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's k-means with the authors' release's arithmetic (module docstring), same interface as
    :func:`kmeans`.

    ``init_indices`` default: :func:`release_init_indices`. Returns ``labels`` (n,) int64 (the
    assignment made at the start of the last iteration, to the centroids before its update, as the
    release returns them), ``centroids`` (k, d) after the last update, and ``iterations`` (updates
    performed). Slower than :func:`kmeans` (one masked mean per cluster and iteration); the distances
    are ``torch.cdist``'s own, with its per-call expansion of ``features`` built once (:class:`_ReleaseDistances`).
    """
    features = _check_features(features)
    _check_params(k, max_iterations, tolerance)
    num_points = features.shape[0]
    if init_indices is None:
        seeds = torch.from_numpy(release_init_indices(num_points, k)).to(features.device)
    else:
        seeds = _init_indices(init_indices, num_points, min(k, num_points), features.device)
    centroids = features[seeds]  # advanced indexing: a copy, updated in place below
    labels = torch.zeros(num_points, dtype=torch.int64, device=features.device)
    distances = _ReleaseDistances(features)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        labels = torch.argmin(distances(centroids), dim=1)
        previous = centroids.clone()
        for cluster in range(centroids.shape[0]):
            members = features[labels == cluster]
            if len(members) > 0:
                centroids[cluster] = members.mean(dim=0)
        if torch.allclose(centroids, previous, rtol=tolerance):  # atol: torch's default, as released
            break
    return labels, centroids, iterations


class _ReleaseDistances:
    """``torch.cdist(features, centroids, p=2)`` bit for bit, with the features' half of the work done once.

    For more than 25 rows on either side, ``cdist`` (its default ``compute_mode``) computes
    ``sqrt(clamp_min([-2x, |x|^2, 1] @ [c, 1, |c|^2]^T, 0))`` and rebuilds the (n, d + 2) left factor on
    every call, which costs ~8x the product itself at the paper's 21,760 x 2,560 grid. This class builds
    that factor once with the same ops, so each call is the product alone and returns the same bits
    (``tests/test_fidelity.py`` compares it with ``torch.cdist``). At 25 rows or fewer on both sides,
    ``cdist`` takes its direct kernel instead, and so does this class.
    """

    _DIRECT_ROWS = 25  # cdist's threshold for its matrix-product path ("use_mm_for_euclid_dist_if_necessary")

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features
        norms = features.pow(2).sum(-1, keepdim=True)
        self.left = torch.cat([features.mul(-2), norms, torch.ones_like(norms)], -1)

    def __call__(self, centroids: torch.Tensor) -> torch.Tensor:
        """(n, k) Euclidean distances from each feature row to each of the (k, d) ``centroids``."""
        if self.features.shape[0] <= self._DIRECT_ROWS and centroids.shape[0] <= self._DIRECT_ROWS:
            return torch.cdist(self.features, centroids, p=2)
        norms = centroids.pow(2).sum(-1, keepdim=True)
        right = torch.cat([centroids, torch.ones_like(norms), norms], -1)
        result = self.left.matmul(right.mT)
        return result.clamp_min_(0).sqrt_()


def _check_features(features: torch.Tensor) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValidationError(f"features must be an (n, d) tensor, got {shape}")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise ValidationError(f"features must have n >= 1 rows and d >= 1 columns, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValidationError(f"features must be floating point, got {features.dtype}")
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    return features


def _check_params(k: int, max_iterations: int, tolerance: float) -> None:
    if k < 1:
        raise ValidationError(f"k must be >= 1, got {k}")
    if max_iterations < 1:
        raise ValidationError(f"max_iterations must be >= 1, got {max_iterations}")
    if not tolerance >= 0:
        raise ValidationError(f"tolerance must be >= 0, got {tolerance}")


def _init_indices(init_indices, num_points: int, k: int, device: torch.device) -> torch.Tensor:
    if init_indices is None:
        return torch.from_numpy(even_init_indices(num_points, k)).to(device)
    if isinstance(init_indices, torch.Tensor):
        seeds = init_indices.detach().cpu()
    else:
        seeds = torch.from_numpy(np.asarray(init_indices))
    if seeds.ndim != 1 or seeds.numel() != k or seeds.dtype not in _INTEGER_DTYPES:
        raise ValidationError(
            f"init_indices must be ({k},) integers (k clamped to n={num_points}), "
            f"got shape {tuple(seeds.shape)} dtype {seeds.dtype}"
        )
    if int(seeds.min()) < 0 or int(seeds.max()) >= num_points:
        raise ValidationError(f"init_indices must lie in [0, {num_points}), got [{int(seeds.min())}, {int(seeds.max())}]")
    return seeds.to(device=device, dtype=torch.int64)


def _assign(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per row: argmin of ``||c||^2 - 2 x.c`` (first index on ties)."""
    scores = torch.addmm((centroids * centroids).sum(dim=1)[None, :], features, centroids.T, alpha=-2.0)
    return scores.argmin(dim=1)


def _update(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's members; an empty cluster keeps its previous centroid."""
    k = centroids.shape[0]
    one_hot = torch.nn.functional.one_hot(labels, k).to(features.dtype)
    sums = one_hot.T @ features
    counts = torch.bincount(labels, minlength=k)
    means = sums / counts.clamp(min=1).to(features.dtype)[:, None]
    return torch.where((counts > 0)[:, None], means, centroids)
