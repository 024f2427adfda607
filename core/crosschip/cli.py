"""The ``crosschip`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from crosschip.errors import CrosschipError


def _backends_data(registry, backend=None) -> dict:
    from crosschip.plugins.registry import REFERENCE
    from crosschip.runtime import Runtime
    from crosschip.specs import COMPONENTS

    plugins = []
    for record in sorted(registry.plugins.values(), key=lambda p: (p.name != REFERENCE, p.name)):
        names = record.backends or [record.name]
        for name in names:
            backend_record = registry.backends.get(name)
            entry = {
                "name": name,
                "plugin": record.value,
                "source": record.source,
                "distribution": record.distribution,
                "version": record.version,
                "status": record.status,
                "reason": record.reason,
                "priority": None,
                "device_types": [],
                "available": False,
                "components": [],
            }
            if backend_record is not None:
                probe = backend_record.probe()
                d = backend_record.descriptor
                entry.update(priority=d.priority, device_types=list(d.device_types),
                             available=probe.available, components=registry.components_of(name),
                             fallbacks=list(d.fallbacks))
                if record.usable:
                    entry["status"] = "available" if probe.available else "unavailable"
                    entry["reason"] = probe.reason
            plugins.append(entry)

    runtime = Runtime(backend, registry=registry, strict=False)
    resolved = {}
    for component in COMPONENTS:
        _, chosen, chain, declines = runtime.select(component)
        resolved[component] = {"backend": chosen, "source": chain.source, "chain": list(chain.backends),
                               "passed_over": [{"backend": b, "reason": r} for b, r in declines]}
    return {"device": str(runtime.device), "backends": plugins, "resolved": resolved}


def _print_backends(data: dict, out) -> None:
    rows = [("backend", "status", "priority", "distribution", "version", "components")]
    for b in data["backends"]:
        rows.append((b["name"], b["status"], "-" if b["priority"] is None else str(b["priority"]),
                     b["distribution"], b["version"], ",".join(b["components"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    reasons = [b for b in data["backends"] if b["reason"]]
    if reasons:
        out.write("\nstatus reasons:\n")
        for b in reasons:
            out.write(f"  {b['name']}: {b['reason']}\n")
    out.write(f"\nresolved components (device {data['device']}):\n")
    width = max(len(c) for c in data["resolved"])
    for component, r in data["resolved"].items():
        line = f"  {component.ljust(width)}  {r['backend']}  (from {r['source']}; chain {' > '.join(r['chain'])})"
        if r["passed_over"]:
            line += "; passed over: " + "; ".join(f"{p['backend']}: {p['reason']}" for p in r["passed_over"])
        out.write(line + "\n")


def cmd_backends(args) -> int:
    from crosschip.plugins.registry import get_registry, strict_from_env

    registry = get_registry()
    data = _backends_data(registry, args.backend)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_backends(data, sys.stdout)
    if strict_from_env(None) and registry.problems():
        registry.raise_for_problems()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosschip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    backends = sub.add_parser("backends", help="list discovered backends and the resolved choice per component")
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    backends.add_argument("--backend", default=None, help="resolve as if this backend (or chain) were requested")
    backends.set_defaults(func=cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CrosschipError as exc:
        sys.stderr.write(f"crosschip: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
