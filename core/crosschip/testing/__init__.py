"""Testing helpers for crosschip and its plugins.

:mod:`crosschip.testing.conformance` is the conformance kit a backend (built-in or third-party)
runs against itself: it compares every component the backend implements with the reference
backend and checks its descriptor and weight layouts.
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

__all__ = [
    "DECLINED", "FAILED", "PASSED", "Case", "ConformanceError", "ConformanceReport", "Outcome",
    "cases", "check_backend", "check_case", "check_descriptor", "check_layout", "default_cases",
    "tolerance_for",
]
