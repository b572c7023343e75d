"""Evaluate an in-memory model on exact-match benchmarks with lm-evaluation-harness, offline."""

from dataselect.evaluation.harness import aggregate, evaluate
from dataselect.evaluation.tasks import Benchmark

__all__ = ["Benchmark", "aggregate", "evaluate"]
