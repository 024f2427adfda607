"""The decision report: which backend built each component, why, and who declined."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from crosschip.specs import describe

logger = logging.getLogger("crosschip.runtime")


@dataclass(frozen=True)
class Decision:
    """One component build: who built it, where the chain came from, who declined and why."""

    component: str
    spec: str  # short description of the spec
    backend: str  # who built it
    source: str  # where the chain came from: argument, CROSSCHIP_BACKEND_X, CROSSCHIP_BACKEND, auto
    chain: tuple[str, ...]
    declines: tuple[tuple[str, str], ...] = ()  # (backend, reason) for every backend passed over

    def line(self) -> str:
        text = f"{self.component}: {self.backend} (from {self.source}; chain {' > '.join(self.chain)})"
        if self.declines:
            text += "; passed over: " + "; ".join(f"{b}: {r}" for b, r in self.declines)
        return text


@dataclass
class DecisionReport:
    """Every decision of a runtime (``runtime.report``); ``str()`` lists the distinct ones."""

    decisions: list[Decision] = field(default_factory=list)
    _logged: set = field(default_factory=set, repr=False)

    def record(self, decision: Decision) -> bool:
        """Add a decision; log it the first time its (component, backend, declines) is seen.
        Returns whether it was new."""
        self.decisions.append(decision)
        key = (decision.component, decision.backend, decision.declines)
        if key in self._logged:
            return False
        self._logged.add(key)
        logger.info("crosschip %s", decision.line())
        return True

    def backends_for(self, component: str) -> set[str]:
        return {d.backend for d in self.decisions if d.component == component}

    def summary(self) -> dict[str, list[dict]]:
        """Unique decisions per component, for ``--json`` output and tests."""
        out: dict[str, list[dict]] = {}
        for d in self.decisions:
            entry = {"backend": d.backend, "source": d.source, "chain": list(d.chain),
                     "declines": [{"backend": b, "reason": r} for b, r in d.declines]}
            entries = out.setdefault(d.component, [])
            if entry not in entries:
                entries.append(entry)
        return out

    def __str__(self) -> str:
        seen, lines = set(), []
        for d in self.decisions:
            if d.line() not in seen:
                seen.add(d.line())
                lines.append(d.line())
        return "\n".join(lines)


__all__ = ["Decision", "DecisionReport", "describe"]
