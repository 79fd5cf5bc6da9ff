"""`isocompress sweep`: how a user chooses a budget. For each budget of a list, the shrink that `shrink --budget B`
makes (into a temporary directory, ONNX included, so that its bytes are measured on the file itself) and what it
gives: parameters, FLOPs, accuracy (or top-1 agreement) on the test data, the certified top-1 share at the certify
radius, ONNX bytes. Limits (max-params, max-bytes, min-accuracy, min-certified-top1) mark the smallest model that
meets them all; a recipe's `[sweep]` table holds the same budgets and limits (api.recipe)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from isocompress.api import plotting
from isocompress.api.recipe import DEFAULT_BUDGETS, SweepLimits, parse_budgets
from isocompress.api.shrink import ShrinkOptions, shrink_file
from isocompress.core.errors import BudgetUnreachable, IsocompressError


def sweep(model: str | Path, *, calibration=None, labels=None, test_data=None, test_labels=None, certify_data=None,
          budgets=DEFAULT_BUDGETS, certify_radius=None, basis: str = "auto", input_radius=None,
          limits: SweepLimits | dict | None = None, plot=None, progress: bool = True,
          ref_intrinsic_length: str | None = None) -> dict:
    """`isocompress sweep`: one row per budget (`sweep_row`), the smallest row meeting every limit marked as
    `chosen` (None without limits or when none meets them), optionally drawn into the PNG `plot`. Every input
    problem is an IsocompressError before the first shrink."""
    from isocompress.core.progress import line_printer

    started, budgets = time.perf_counter(), parse_budgets(budgets, "sweep", "budgets")
    limits = limits if isinstance(limits, SweepLimits) else SweepLimits(**(limits or {}))
    plot = plotting.prepare_plot(plot)
    options = [ShrinkOptions(budget=b, basis=basis, certify_radius=certify_radius, input_radius=input_radius,
                             formats=("onnx",), ref_intrinsic_length=ref_intrinsic_length) for b in budgets]
    data = {"calibration": calibration, "labels": labels, "test_data": test_data, "test_labels": test_labels,
            "certify_data": certify_data}
    check_measurable(limits, data)
    say = line_printer() if progress else None
    rows = []
    for k, (text, opts) in enumerate(zip(budgets, options), 1):
        if say is not None:
            say(f"sweep {k}/{len(budgets)}: {Path(model).name} at budget {text}")
        rows.append(sweep_row(model, text, opts, data, limits))
    chosen = choose(rows, limits)
    result = {"model": str(model), "budgets": list(budgets), "limits": limits.given(), "rows": rows,
              "chosen": chosen, "chosen_budget": None if chosen is None else rows[chosen]["budget"],
              "data": {k: None if v is None else str(v) for k, v in data.items()},
              "certify_radius": list(certify_radius) if isinstance(certify_radius, tuple) else certify_radius,
              "seconds": round(time.perf_counter() - started, 3)}
    if plot is not None:
        plotting.plot_sweep(result, plot)
        result["plot"] = str(plot)
    return result


DATA_FIELDS = ("calibration", "labels", "test_data", "test_labels", "certify_data")
LIMIT_FIELDS = ("max_params", "max_bytes", "min_accuracy", "min_certified_top1")


def sweep_arguments(recipe_path=None, **flags) -> dict:
    """`sweep`'s keyword arguments from a recipe (its data files, basis, certify radius and [sweep] table: budgets and
    limits) with command-line flags over it (None: not given), parsed as the CLI parses them (errors name the flag)."""
    from isocompress.api.recipe import COMMAND_LINE, load_recipe, parse_radii

    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    if recipe is not None and not recipe.exact and recipe.sweep is None:
        raise IsocompressError(f"{recipe_path}: has a goal (budget, max-error or min-certified-top1); a sweep tries its"
                               " own budgets (--budgets, or the recipe's [sweep] table): drop the goal")
    table = dict(recipe.sweep or {}) if recipe is not None else {}
    out = {key: getattr(recipe, key) for key in DATA_FIELDS} if recipe is not None else dict.fromkeys(DATA_FIELDS)
    for data, labels in (("calibration", "labels"), ("test_data", "test_labels")):
        if flags.get(data) is not None and flags.get(labels) is None:
            out[labels] = None  # the recipe's labels belong to the recipe's inputs
    out.update({key: flags[key] for key in DATA_FIELDS if flags.get(key) is not None})
    out["basis"] = flags.get("basis") or (recipe.basis if recipe is not None else "auto")
    out["ref_intrinsic_length"] = flags.get("ref_intrinsic_length") or \
        (recipe.ref_intrinsic_length if recipe is not None else None)
    out["input_radius"] = recipe.input_radius if recipe is not None else None
    radius = flags.get("certify_radius")
    out["certify_radius"] = parse_radii(radius, COMMAND_LINE, "certify-radius") if radius is not None else \
        (recipe.certify_radius if recipe is not None else None)
    budgets = flags.get("budgets")
    out["budgets"] = parse_budgets(budgets, COMMAND_LINE) if budgets is not None else \
        table.pop("budgets", DEFAULT_BUDGETS)
    table.pop("budgets", None)
    given = SweepLimits(**{k: flags[k] for k in LIMIT_FIELDS if flags.get(k) is not None}, where=COMMAND_LINE)
    out["limits"] = SweepLimits(**{k.replace("-", "_"): v for k, v in {**table, **given.given()}.items()})
    return out


def check_measurable(limits: SweepLimits, data: dict) -> None:
    """Each limit has what it is measured on, before any work."""
    from isocompress.formats.data import has_labels

    labelled = data["labels"] is not None or data["test_labels"] is not None or \
        (data["test_data"] is not None and has_labels(data["test_data"]))
    if limits.min_accuracy is not None and not labelled:
        raise IsocompressError("--min-accuracy needs labels: give --test-data T.npz holding x and y (or with"
                               " --test-labels), or --calibration with --labels")
    if limits.min_certified_top1 is not None and data["calibration"] is None and data["certify_data"] is None:
        raise IsocompressError("--min-certified-top1 needs points to certify: give --calibration FILE or"
                               " --certify-data FILE")


def sweep_row(model, budget: str, options: ShrinkOptions, data: dict, limits: SweepLimits) -> dict:
    """One budget: shrink into a temporary directory (ONNX written and verified there), read the report."""
    with tempfile.TemporaryDirectory(prefix="isocompress-sweep-") as tmp:
        try:
            report = shrink_file(model, Path(tmp) / "out", options, progress=False, **data)
        except BudgetUnreachable as exc:
            return {"budget": budget, "reachable": False, "note": str(exc), "meets": {k: False for k in
                                                                                      limits.given()}}
    row = row_of_report(budget, report)
    if limits.min_certified_top1 is not None and row["certified_top1"] is None:
        why = row["certified_note"] or "this network has one output, so it has no top-1 class to certify"
        raise IsocompressError(f"--min-certified-top1 needs certified top-1 classes: {why}")
    row["meets"] = limits.meets(row)
    return row


def row_of_report(budget: str, report: dict) -> dict:
    pruning = report["pruning"]
    measured = pruning.get("test") or pruning["empirical"]
    local = pruning.get("local") or {}
    before, flops_before = report["params_before"], max(report["flops_before"], 1)
    return {
        "budget": budget, "reachable": True,
        "params": report["params_after"], "params_fraction": report["params_after"] / before,
        "flops": report["flops_after"], "flops_fraction": report["flops_after"] / flops_before,
        "widths": report["widths_after"], "onnx_bytes": report["bytes_after"]["onnx"],
        "accuracy": measured.get("accuracy_after"), "accuracy_before": measured.get("accuracy_before"),
        "top1_agreement": measured.get("top1_agreement"),
        "measured_on": "test data" if "test" in pruning else pruning["empirical"]["inputs"],
        "certified_top1": local.get("certified_top1"), "refuted_fraction": local.get("refuted_fraction"),
        "undecided_fraction": local.get("undecided_fraction"), "certify_radius": local.get("radius"),
        "certified_note": local.get("note"), "certified_max_abs": pruning["certified"]["max_abs"],
    }


def choose(rows: list[dict], limits: SweepLimits) -> int | None:
    """The index of the smallest reachable row (fewest parameters, then fewest ONNX bytes) meeting every limit."""
    if not limits.given():
        return None
    ok = [i for i, row in enumerate(rows) if row["reachable"] and all(row["meets"].values())]
    return min(ok, key=lambda i: (rows[i]["params"], rows[i]["onnx_bytes"])) if ok else None


def format_sweep(result: dict) -> str:
    """The table: one row per budget, the chosen one marked, and what the marks mean."""
    rows = result["rows"]
    accuracy = any(r.get("accuracy") is not None for r in rows)
    radius = next((r["certify_radius"] for r in rows if r.get("certify_radius") is not None), None)
    header = ("budget", "parameters", "FLOPs", "accuracy" if accuracy else "top-1 agreement",
              "certified top-1" + (f" (ε = {radius:.3g})" if radius is not None else ""), "ONNX bytes", "")
    table = [header]
    for i, r in enumerate(rows):
        if not r["reachable"]:
            table.append((r["budget"], "unreachable", "", "", "", "", ""))
            continue
        quality = r["accuracy"] if accuracy else r["top1_agreement"]
        failed = ", ".join(f"fails {k}" for k, ok in r["meets"].items() if not ok)
        mark = "← smallest meeting the limits" if i == result["chosen"] else failed or \
            ("meets the limits" if r["meets"] else "")
        table.append((r["budget"], f"{r['params']:,} ({r['params_fraction']:.1%})",
                      f"{r['flops']:,} ({r['flops_fraction']:.1%})", "-" if quality is None else f"{quality:.2%}",
                      "-" if r["certified_top1"] is None else f"{r['certified_top1']:.1%}", f"{r['onnx_bytes']:,}",
                      mark))
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    measured = next((r["measured_on"] for r in rows if r["reachable"]), None)
    note = next((r["certified_note"] for r in rows if r["reachable"] and r["certified_top1"] is None
                 and r.get("certified_note")), None)
    if measured is not None:
        certified = f"- ({note})" if note else "local certificates at the certify radius (docs/bounds.md §8)"
        lines.append(f"{'accuracy' if accuracy else 'agreement'} on {measured}; certified top-1: {certified};"
                     " ONNX bytes: the exported file")
    if result["limits"]:
        limits = SweepLimits(**{k.replace("-", "_"): v for k, v in result["limits"].items()}).describe()
        lines.append(f"limits: {limits}; " + (f"smallest meeting them: budget {result['chosen_budget']}"
                                               if result["chosen"] is not None else "no budget meets them all"))
    for r in rows:
        if not r["reachable"]:
            lines.append(f"budget {r['budget']}: {r['note']}")
    return "\n".join(lines)


def resolve_recipe(model, recipe, progress: bool = False):
    """A recipe whose goal is a [sweep] table: run the sweep over its budgets with its data and return (the recipe with
    the chosen budget as its goal, the sweep's record for report["recipe"]["sweep"]). No budget meeting every limit
    is an input error naming them (nothing is written)."""
    from dataclasses import replace

    from isocompress.core.parsing import parse_budget

    table = dict(recipe.sweep)
    budgets = table.pop("budgets")
    result = sweep(model, calibration=recipe.calibration, labels=recipe.labels, test_data=recipe.test_data,
                   test_labels=recipe.test_labels, certify_data=recipe.certify_data, budgets=budgets,
                   certify_radius=recipe.certify_radius, basis=recipe.basis, input_radius=recipe.input_radius,
                   limits=SweepLimits(**{k.replace("-", "_"): v for k, v in table.items()}), progress=progress,
                   ref_intrinsic_length=recipe.ref_intrinsic_length)
    if result["chosen"] is None:
        limits = SweepLimits(**{k.replace("-", "_"): v for k, v in table.items()}).describe()
        raise IsocompressError(f"{recipe.where}: no budget of its [sweep] ({', '.join(budgets)}) meets every limit"
                               f" ({limits}); nothing was written; loosen a limit or add budgets (isocompress sweep"
                               " shows each budget's measures)")
    chosen = replace(recipe, sweep=None, budget=parse_budget(result["chosen_budget"], recipe.where))
    record = {"budgets": list(budgets), "limits": result["limits"], "chosen_budget": result["chosen_budget"],
              "rows": [{k: r.get(k) for k in ("budget", "reachable", "params", "onnx_bytes", "accuracy",
                                              "top1_agreement", "certified_top1", "meets")} for r in result["rows"]]}
    return chosen, record
