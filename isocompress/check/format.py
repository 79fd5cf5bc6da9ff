"""`isocompress check` output: the aligned PASS/FAIL rows and the summary line."""

from __future__ import annotations

from isocompress.check.config import PERCENT_OF_Y
from isocompress.check.measure import CheckResult


# --- output ------------------------------------------------------------------------------------------------------
def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "params":
        return f"{int(value):,}"
    if unit == "bytes":
        return f"{int(value):,} B"
    if unit == "fraction":
        return f"{100.0 * value:.2f}%"
    if unit == PERCENT_OF_Y:
        return f"{value:.3g}%"
    return f"{value:.3g}"


def fmt_change(value, unit: str) -> str:
    """A signed difference in the metric's unit (accuracy in points)."""
    sign = "+" if value > 0 else ("-" if value < 0 else "±")
    if unit == "fraction":
        return f"{sign}{100.0 * abs(value):.2f} points"
    if unit == PERCENT_OF_Y:
        return f"{sign}{abs(value):.3g} points"
    return f"{sign}{fmt(abs(value), unit)}"


def comparison(r: CheckResult) -> str:
    if r.metric == "shrink":
        return "failed"
    ops = {("<=", True): "≤", ("<=", False): ">", (">=", True): "≥", (">=", False): "<"}
    text = f"{fmt(r.measured, r.unit)} {ops[(r.op, r.passed)]} {fmt(r.limit, r.unit)}"
    return text + " of max |y|" if r.unit == PERCENT_OF_Y else text


def tail(r: CheckResult, with_baseline: bool) -> str:
    parts = []
    if not r.passed and r.metric == "shrink":
        parts.append(f"{r.note}; {r.advice}")
    elif not r.passed:
        word = "over" if r.op == "<=" else "under"
        pct = f" ({'+' if r.op == '<=' else '-'}{r.excess_percent:.1f}%)" if r.excess_percent is not None else ""
        amount = f"{100 * r.excess:.2f} points" if r.unit == "fraction" else fmt(r.excess, r.unit)
        parts.append(f"{word} by {amount}{pct}; {r.advice}")
    if with_baseline and r.metric != "shrink":
        if r.baseline is None:
            parts.append("baseline: none")
        else:
            relative = r.change_percent is not None and r.unit not in ("fraction", PERCENT_OF_Y)
            pct = f" ({r.change_percent:+.1f}%)" if relative and r.change else (" (0.0%)" if relative else "")
            parts.append(f"baseline {fmt(r.baseline, r.unit)}: {fmt_change(r.change, r.unit)}{pct}")
    return "; ".join(parts)


def label(r: CheckResult) -> str:
    if r.metric == "bytes":
        return f"bytes ({r.measure})"
    if r.metric == "error":
        return f"error ({r.measure})"
    return r.metric


def subject(r: CheckResult) -> str:
    text = r.model + (f" [{r.recipe_name}]" if r.recipe_name else "")
    return f"{r.name}: {text}" if r.name else text


def format_results(results: list[CheckResult], color: bool = False, with_baseline: bool = False) -> str:
    """One aligned row per limit, `STATUS  SUBJECT  METRIC  MEASURED OP LIMIT  [excess; advice] [baseline]`,
    then one summary line."""
    rows = [(r.status, subject(r), label(r), comparison(r), tail(r, with_baseline)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for r, row in zip(results, rows):
        status = row[0]
        if color:
            import click

            status = click.style(status, fg="green" if r.passed else "red", bold=not r.passed)
        cells = [status] + [row[i].ljust(widths[i]) for i in (1, 2, 3)] + [row[4]]
        lines.append("  ".join(cells).rstrip())
    lines.append(summary(results))
    return "\n".join(lines)


def summary(results: list[CheckResult]) -> str:
    failed = sum(not r.passed for r in results)
    if failed == 0:
        return f"isocompress check: all {len(results)} limits passed"
    return f"isocompress check: {failed} of {len(results)} limits FAILED"


def exit_code(results: list[CheckResult]) -> int:
    return 0 if all(r.passed for r in results) else 1
