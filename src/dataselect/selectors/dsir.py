"""DSIR (Xie et al., 2023; a LESS baseline): importance resampling on hashed n-grams.

    features  c(x) = counts of x's hashed unigrams and bigrams (``num_buckets`` buckets)
    p_raw     = the pool's summed counts, normalized; p_target = the validation set's
    w(x)      = sum_j c_j(x) * (log(p_target_j + 1e-8) - log(p_raw_j + 1e-8))
                (log importance weight)
    resample: the top-k of w(x) + Gumbel noise = importance resampling without replacement
    topk:     the top-k of w(x)

Exactly the authors' ``data-selection`` package (``HashedNgramDSIR``): its featurizer
(``get_ngram_counts``: lower-cased text, NLTK's wordpunct tokenizer, sha256 buckets), its
bag-of-words fit (every pool and target token: ``num_tokens_to_fit='all'``), its
importance estimator and its length filter (``min_example_length`` words, counted as the
package counts them). Two differences: the Gumbel noise comes from a numpy Generator seeded
by the run's seed (the package draws from the unseeded global ``np.random``), and the cut
orders by (key desc, pool order asc) where the package's ``argpartition`` leaves ties and
order arbitrary.

The pool's per-example counts (a sparse CSR matrix) and their total are the pool side: they
depend on the pool and the featurizer only, so their key leaves the target out; a new target
costs only its own counts. ``p_raw`` is the whole pool's (the package's raw dataset), not the
candidates' left after decontamination.

Unlike the model passes (``features.distributed``), the counts are one pass in one process,
not a job of shards: no model, about 370 200-word texts a second on a loaded 2-core machine
(12 min for a 270k-example pool), so a kill loses minutes, and splitting it would add a
merge step to save little.

Rankings go through ``ranking.top_k``: w(x) is computed fast (sparse product) and, for the
few candidates whose order that leaves open, canonically (a fixed tree of float64 adds).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import data_selection
import numpy as np
import scipy.sparse as sp
from data_selection.hashed_ngram_dsir import get_ngram_counts, word_tokenize, wpt
from omegaconf import DictConfig

from dataselect.context import Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.passes import example_text
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.keys import artifact_key, pool_spec
from dataselect.progress import progress
from dataselect.selectors.base import Selection, Selector, one_of
from dataselect.selectors.ranking import dot_tolerance, top_k, tree_sum

log = logging.getLogger(__name__)

MODES = ("resample", "topk")
TEXTS = ("all", "prompt")
TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "wordpunct": wpt.tokenize,  # the package's default
    "word_tokenize": word_tokenize,  # needs NLTK's punkt data
}
SMOOTHING = 1e-8  # the package's: log(p + 1e-8)
_RESCORE_ROWS = 1024  # dense float64 rows per block when re-scoring canonically


def _tokenizer(name: str) -> Callable[[str], list[str]]:
    one_of("dsir", "tokenizer", name, TOKENIZERS)
    return TOKENIZERS[name]


def ngram_counts(
    texts: list[str], ngrams: int = 2, num_buckets: int = 10000, tokenizer: str = "wordpunct"
) -> sp.csr_matrix:
    """(len(texts), num_buckets) int32 CSR: each text's hashed n-gram counts, the package's
    ``featurizer`` (``get_ngram_counts``) row by row."""
    tok = _tokenizer(tokenizer)
    indptr, indices, data = [0], [], []
    with progress("hashed n-gram counts", len(texts), unit="texts") as advance:
        for text in texts:
            c = get_ngram_counts(text, n=ngrams, num_buckets=num_buckets, tokenizer=tok)
            nz = np.flatnonzero(c)
            indices.append(nz.astype(np.int32))
            data.append(c[nz].astype(np.int32))
            indptr.append(indptr[-1] + len(nz))
            advance(1)
    cat = (lambda xs: np.concatenate(xs)) if texts else (lambda xs: np.zeros(0, np.int32))
    return sp.csr_matrix(
        (cat(data), cat(indices), np.asarray(indptr, dtype=np.int64)),
        shape=(len(texts), num_buckets),
    )


def bucket_totals(counts: sp.csr_matrix) -> np.ndarray:
    """(num_buckets,) int64: the counts summed over rows (exact)."""
    tot = np.bincount(counts.indices, weights=counts.data, minlength=counts.shape[1])
    return np.rint(tot).astype(np.int64)


def log_ratio(target_totals: np.ndarray, raw_totals: np.ndarray) -> np.ndarray:
    """log(p_target + 1e-8) - log(p_raw + 1e-8), the package's ``log_diff``."""
    p_target = target_totals / target_totals.sum()
    p_raw = raw_totals / raw_totals.sum()
    return np.log(p_target + SMOOTHING) - np.log(p_raw + SMOOTHING)


def example_lengths(counts: sp.csr_matrix, ngrams: int) -> np.ndarray:
    """Words per row as the package counts them (``get_perexample_metadata``): the n-gram
    count plus n(n-1)/2, floor-divided by n (for n=2: unigrams + bigrams = 2w - 1 -> w)."""
    total = np.asarray(counts.sum(axis=1), dtype=np.int64).ravel()
    return (total + ngrams * (ngrams - 1) // 2) // ngrams


@dataclass
class LogWeights:
    """w(x) for rows of ``counts``: ``fast`` (sparse product), each within ``tol`` of its
    canonical value, which ``canonical(positions)`` computes."""

    counts: sp.csr_matrix
    log_diff: np.ndarray
    fast: np.ndarray
    tol: np.ndarray

    @classmethod
    def of(cls, counts: sp.csr_matrix, log_diff: np.ndarray) -> LogWeights:
        counts = counts.astype(np.float64)
        fast = np.asarray(counts @ log_diff, dtype=np.float64).ravel()
        # |c_j * log_diff_j| summed: the scale of the rounding error of any summation order
        scale = np.asarray(counts @ np.abs(log_diff), dtype=np.float64).ravel()
        tol = dot_tolerance(counts.shape[1], scale=1.0) * scale * (1.0 + 1e-6)
        return cls(counts, log_diff, fast, tol)

    def canonical(self, positions: np.ndarray) -> np.ndarray:
        """The rows' weights as float64 products summed in a fixed pairwise tree."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions))
        for s in range(0, len(positions), _RESCORE_ROWS):
            dense = self.counts[positions[s : s + _RESCORE_ROWS]].toarray()
            out[s : s + _RESCORE_ROWS] = tree_sum(dense * self.log_diff)
        return out


def importance_weights(
    counts: sp.csr_matrix, raw_totals: np.ndarray, target_totals: np.ndarray
) -> LogWeights:
    """The log importance weights of ``counts``' rows, given the raw and target totals."""
    if target_totals.sum() <= 0:
        raise ValueError("dsir: the target's validation text has no tokens to fit p_target on")
    if raw_totals.sum() <= 0:
        raise ValueError("dsir: the pool's text has no tokens to fit p_raw on")
    return LogWeights.of(counts, log_ratio(target_totals, raw_totals))


@dataclass
class NgramCounts:
    """The pool side: hashed n-gram counts, one row per pool example in ``ids`` order, and
    their total over the whole pool (p_raw's counts)."""

    ids: list[str]
    counts: sp.csr_matrix
    raw_totals: np.ndarray
    ngrams: int
    tokenizer: str

    def rows(self, ids: list[str]) -> sp.csr_matrix:
        at = {i: r for r, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in at]
        if missing:
            raise KeyError(f"dsir: {len(missing)} candidates have no counts, e.g. {missing[:3]}")
        return self.counts[np.array([at[i] for i in ids], dtype=np.int64)]

    def save(self, path: Path) -> None:
        sp.save_npz(path / "counts.npz", self.counts, compressed=False)
        np.save(path / "raw_totals.npy", self.raw_totals)
        (path / "ids.json").write_text(json.dumps(self.ids))

    @classmethod
    def load(cls, path: Path, ngrams: int, tokenizer: str) -> NgramCounts:
        counts = sp.load_npz(path / "counts.npz").tocsr()
        ids = json.loads((path / "ids.json").read_text())
        return cls(ids, counts, np.load(path / "raw_totals.npy"), ngrams, tokenizer)


@dataclass(frozen=True)
class DSIRPass(FeatureRequest[NgramCounts]):
    """The pool's hashed n-gram counts (target-agnostic: cached once per pool and featurizer)."""

    ngrams: int = 2
    num_buckets: int = 10000
    tokenizer: str = "wordpunct"

    def needs_warmup(self) -> bool:
        return False  # text only

    def key(self, cfg: DictConfig) -> str:
        return artifact_key(
            {
                "pool": pool_spec(cfg),
                "text": "all",
                "dsir": {
                    "ngrams": self.ngrams,
                    "num_buckets": self.num_buckets,
                    "tokenizer": self.tokenizer,
                    "data_selection": data_selection.__version__,
                },
            }
        )

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        what = f"pool hashed {self.ngrams}-grams ({self.num_buckets} buckets)"
        return [Planned("dsir_ngrams", what, self.key(cfg), sizes.pool, None, None)]

    def featurize(self, pool: list[Example]) -> NgramCounts:
        texts = [example_text(e, "all") for e in pool]
        counts = ngram_counts(texts, self.ngrams, self.num_buckets, self.tokenizer)
        return NgramCounts(
            [e.id for e in pool], counts, bucket_totals(counts), self.ngrams, self.tokenizer
        )

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[NgramCounts]:
        pool, key = inputs.pool, self.key(ctx.cfg)

        def build(work: Path) -> None:
            log.info("dsir: hashed n-gram counts of %d pool examples", len(pool))
            self.featurize(pool).save(work)

        art = ctx.artifact("dsir_ngrams", key, build)
        value = NgramCounts.load(art.path, self.ngrams, self.tokenizer)
        nbytes = sum(f.stat().st_size for f in art.path.iterdir() if f.is_file())
        return Features(value, key, [art.costed("pool", nbytes, len(pool))])


class DSIRSelector(Selector[NgramCounts]):
    name = "dsir"

    def __init__(
        self,
        mode: str = "resample",
        target_text: str = "all",
        ngrams: int = 2,
        num_buckets: int = 10000,
        tokenizer: str = "wordpunct",
        min_example_length: int = 0,
    ):
        one_of("dsir", "mode", mode, MODES)
        one_of("dsir", "target_text", target_text, TEXTS)
        _tokenizer(tokenizer)
        if int(ngrams) < 1 or int(num_buckets) < 1 or int(min_example_length) < 0:
            raise ValueError(
                f"dsir: ngrams ({ngrams}) and num_buckets ({num_buckets}) must be >= 1 and "
                f"min_example_length ({min_example_length}) >= 0"
            )
        self.mode, self.target_text, self.tokenizer = mode, target_text, tokenizer
        self.ngrams, self.num_buckets = int(ngrams), int(num_buckets)
        self.min_example_length = int(min_example_length)

    def request(self) -> DSIRPass:
        return DSIRPass(self.ngrams, self.num_buckets, self.tokenizer)

    def target_totals(self, target: Target) -> np.ndarray:
        """The validation set's summed counts (the package's target bag of words)."""
        texts = [example_text(v, self.target_text) for v in target.validation]
        return bucket_totals(ngram_counts(texts, self.ngrams, self.num_buckets, self.tokenizer))

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: NgramCounts | None = None,
    ) -> Selection:
        if not isinstance(features, NgramCounts):
            raise ValueError("dsir needs the pipeline's n-gram counts of the pool (its request)")
        if features.counts.shape[1] != self.num_buckets or features.ngrams != self.ngrams:
            raise ValueError(
                f"dsir: the counts have {features.counts.shape[1]} buckets of "
                f"{features.ngrams}-grams, the selector wants {self.num_buckets} of {self.ngrams}"
            )
        counts = features.rows([e.id for e in pool])
        lengths = example_lengths(counts, self.ngrams)
        eligible = np.flatnonzero(lengths >= self.min_example_length)
        if len(eligible) < budget:
            raise ValueError(
                f"dsir: budget {budget} but only {len(eligible)} of {len(pool)} candidates have "
                f"at least min_example_length={self.min_example_length} words; lower "
                "min_example_length (0 keeps every example) or the budget"
            )
        target_totals = self.target_totals(target)
        weights = importance_weights(counts[eligible], features.raw_totals, target_totals)
        if self.mode == "topk":
            pos, vals = top_k(weights.fast, budget, weights.tol, weights.canonical)
            chosen_w = vals
        else:  # Gumbel top-k: a draw of `budget` without replacement, P ~ exp(w)
            gumbel = np.random.default_rng(seed).gumbel(size=len(eligible))
            keys = weights.fast + gumbel
            u = float(np.finfo(np.float64).eps) / 2
            tol = weights.tol + 4 * u * (np.abs(keys) + weights.tol)

            def rescore(p: np.ndarray) -> np.ndarray:
                return weights.canonical(p) + gumbel[p]

            pos, vals = top_k(keys, budget, tol, rescore)
            chosen_w = weights.fast[pos]
        return Selection.of(
            pool,
            eligible[pos],
            [float(s) for s in vals],
            mode=self.mode,
            score="log importance weight"
            if self.mode == "topk"
            else "log importance weight + Gumbel noise",
            eligible=int(len(eligible)),
            too_short=int(len(pool) - len(eligible)),
            min_example_length=self.min_example_length,
            log_weight_mean_selected=float(np.mean(chosen_w)),
            log_weight_mean_candidates=float(np.mean(weights.fast)),
            target_ngrams=int(target_totals.sum()),
        )
