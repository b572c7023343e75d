"""Reliability drills: the bad-input corpus (``dataselect.reliability.corpus``)."""

from dataselect.reliability.corpus import CASES, Case, Expect, Outcome, run_case, verify

__all__ = ["CASES", "Case", "Expect", "Outcome", "run_case", "verify"]
