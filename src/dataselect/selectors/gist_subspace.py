"""GIST's linear algebra: the task subspace of the validation gradients and the scores in it.

    K = G G^T (N x N, never D x D); eigh -> U, lambda; S = sqrt(lambda)
    P = G^T U_k S_k^-1 (D x k): the top-k right singular vectors, an isometry onto the task
    subspace (not a whitening); validation coordinates U_k S_k (= G P)

Shared by the selector (``gist.py``, also in sketch space) and its pool pass
(``gist_pass.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataselect.selectors.ranking import FAST, Arithmetic


@dataclass
class Subspace:
    """The task subspace of validation gradients G (N x D)."""

    P: np.ndarray  # (D, k) orthonormal columns: top-k right singular vectors of G
    val_coords: np.ndarray  # (N, k) = U_k S_k = G P
    eigvals: np.ndarray  # (N,) eigenvalues of G G^T, descending (squared singular values)

    @property
    def k(self) -> int:
        return self.P.shape[1]


def choose_rank(eigvals: np.ndarray, k: int | None, variance: float | None) -> int:
    """k fixed (capped at the numerical rank) or the fewest components explaining ``variance``."""
    lam = np.clip(eigvals, 0.0, None)
    rank = int((lam > lam[0] * 1e-10).sum()) if lam[0] > 0 else 0
    if rank == 0:
        raise ValueError("gist: the validation gradients are all zero")
    if variance is not None:
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"gist: variance must be in (0, 1], got {variance}")
        share = np.cumsum(lam) / lam.sum()
        return min(int(np.searchsorted(share, variance - 1e-12) + 1), rank)
    if k is None or k < 1:
        raise ValueError(f"gist: k must be >= 1, got {k}")
    return min(k, rank)


def gram_eig(G: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of G G^T (N x N, float64), G read in D-chunks."""
    n, d = G.shape
    gram = np.zeros((n, n), dtype=np.float64)
    for s in range(0, d, chunk):
        block = np.asarray(G[:, s : s + chunk], dtype=np.float64)
        gram += block @ block.T
    lam, U = np.linalg.eigh(gram)
    return lam[::-1].copy(), U[:, ::-1].copy()


def task_subspace(
    G: np.ndarray, k: int | None = 150, variance: float | None = None, chunk: int = 65536
) -> Subspace:
    """Top-k right singular subspace of G through the N x N Gram matrix, in D-chunks.

    Memory: the Gram is N x N (float64); P is built ``chunk`` rows of D at a time, so nothing
    D x D and no second copy of G is ever formed. G may be a memory-mapped array.
    """
    d = G.shape[1]
    lam, U = gram_eig(G, chunk)
    r = choose_rank(lam, k, variance)
    S = np.sqrt(lam[:r])
    P = np.empty((d, r), dtype=np.float32)
    for s in range(0, d, chunk):  # P = G^T U_k S_k^-1, chunk by chunk of D
        block = np.asarray(G[:, s : s + chunk], dtype=np.float64)
        P[s : s + chunk] = (block.T @ U[:, :r]) / S
    return Subspace(P=P, val_coords=U[:, :r] * S, eigvals=np.clip(lam, 0.0, None))


def effective_rank(eigvals: np.ndarray) -> float:
    """exp(entropy) of the normalized spectrum (Roy & Vetterli): 1 = one direction."""
    p = np.clip(eigvals, 0.0, None)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def gist_scores(
    train_coords: np.ndarray,
    val_coords: np.ndarray,
    groups: list[np.ndarray],
    energy: np.ndarray | None = None,
    ar: Arithmetic = FAST,
) -> np.ndarray:
    """(n_pool, n_subtasks) cosines with each subtask's mean validation coordinates."""
    centers = ar.normalize(np.stack([ar.mean(val_coords[g], axis=0) for g in groups]))
    cos = ar.dot(ar.normalize(train_coords), centers)
    return cos * energy[:, None] if energy is not None else cos


@dataclass
class GISTCoords:
    """What exact GIST needs from the pipeline: the subspace and the pool's coordinates."""

    subspace: Subspace
    ids: list[str]  # pool ids, in the order of ``coords``
    coords: np.ndarray  # (n_pool, k) = P^T g
    grad_norms: np.ndarray  # (n_pool,) |g|, for the energy weighting
