"""The spectrum GIST rests on: singular values and cumulative explained variance of the
validation gradients, per warmup checkpoint, with the chosen rank k marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataselect.selectors.gist_subspace import effective_rank


def _rank_for(share: np.ndarray, level: float) -> int:
    return int(np.searchsorted(share, level - 1e-12) + 1)


def spectrum_summary(spectra: dict[str, list | np.ndarray]) -> dict[str, dict]:
    """Per checkpoint: effective rank and the k explaining 50 / 90 / 99% of the energy."""
    out = {}
    for name, lam in spectra.items():
        lam = np.clip(np.asarray(lam, dtype=np.float64), 0.0, None)
        share = np.cumsum(lam) / lam.sum()
        out[name] = {
            "n": len(lam),
            "effective_rank": effective_rank(lam),
            **{f"k_{int(100 * q)}": _rank_for(share, q) for q in (0.5, 0.9, 0.99)},
        }
    return out


def plot_spectra(spectra: dict[str, list | np.ndarray], k: int | None, path: Path) -> Path:
    """Two panels: singular values (log scale) and cumulative explained variance vs rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, lam in spectra.items():
        lam = np.clip(np.asarray(lam, dtype=np.float64), 0.0, None)
        ranks = np.arange(1, len(lam) + 1)
        ax1.semilogy(ranks, np.sqrt(np.maximum(lam, 1e-30)), marker=".", label=name)
        ax2.plot(ranks, np.cumsum(lam) / lam.sum(), marker=".", label=name)
    for ax in (ax1, ax2):
        if k is not None:
            ax.axvline(k, color="gray", linestyle="--", linewidth=1, label=f"k = {k}")
        ax.set_xlabel("rank")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("singular value of G")
    ax1.set_title("validation-gradient spectrum")
    ax2.set_ylabel("cumulative explained variance")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("explained variance")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
