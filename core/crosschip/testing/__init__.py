"""Testing helpers for crosschip and its plugins.

:mod:`crosschip.testing.conformance` is the conformance kit a backend (built-in or third-party)
runs against itself: it compares every component the backend implements with the reference
backend and checks its descriptor and weight layouts. :mod:`crosschip.testing.parity` is the kit a
model author runs: it checks a model class against its transformers counterpart (logits, loss,
gradients, save and load, greedy generation, tensor parallelism).
"""

from crosschip.testing.conformance import (
    DECLINED,
    FAILED,
    PASSED,
    Case,
    ConformanceError,
    ConformanceReport,
    Outcome,
    cases,
    check_backend,
    check_case,
    check_descriptor,
    check_layout,
    default_cases,
    tolerance_for,
)
from crosschip.testing import parity
from crosschip.testing.parity import ParityError, ParityReport

__all__ = [
    "DECLINED", "FAILED", "PASSED", "Case", "ConformanceError", "ConformanceReport", "Outcome",
    "cases", "check_backend", "check_case", "check_descriptor", "check_layout", "default_cases",
    "tolerance_for", "parity", "ParityError", "ParityReport",
]
