"""PNG figures of what a user chooses by: the local certificates' verdicts against ε (`shrink --plot`), a sweep over
budgets (`sweep --plot`). matplotlib (the optional extra `isocompress[plot]`) is imported only when a figure is drawn,
through its object API (no pyplot, no global backend switch); every file is written atomically."""

from __future__ import annotations

from pathlib import Path

from isocompress.core.errors import IsocompressError


def check_plot_path(path: str | Path) -> Path:
    """Refuse a --plot path before any work is done: it must end in .png and its folder must exist."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise IsocompressError(f"{path}: --plot writes a PNG; give a file name ending in .png")
    if not path.parent.is_dir():
        raise IsocompressError(f"{path}: folder {path.parent} does not exist; create it or choose another --plot path")
    if path.is_dir():
        raise IsocompressError(f"{path}: is a directory; give --plot a file name ending in .png")
    return path


def require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise IsocompressError("--plot needs matplotlib; install isocompress[plot] (pip install 'isocompress[plot]')") from None
    return Figure, FigureCanvasAgg


def prepare_plot(path: str | Path | None) -> Path | None:
    """A --plot path checked, and matplotlib present, before the (slow) work that the plot draws."""
    if path is None:
        return None
    path = check_plot_path(path)
    require_matplotlib()
    return path


def new_figure(size=(8, 4.8)):
    Figure, FigureCanvasAgg = require_matplotlib()
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def write_png(fig, path: str | Path) -> Path:
    """The figure into `path`, atomically (a temporary file in the same folder, then os.replace)."""
    from isocompress.formats.io import atomic_path

    path = check_plot_path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    except OSError as exc:
        raise IsocompressError(f"{path}: cannot write the plot ({exc.strerror}); choose another path") from None
    return path


# --- the verdicts against ε --------------------------------------------------------------------------------------
def curve_of(local: dict | None) -> list[dict]:
    """The curve of report["pruning"]["local"] (one entry for a single ε); an error naming the fix without one."""
    if not local or not local.get("computed", True):
        note = (local or {}).get("note", "no local certificates were computed")
        raise IsocompressError(f"--plot draws the local certificates against ε, and there are none: {note}")
    if local.get("n_certified") is None:
        raise IsocompressError("--plot draws the certified top-1 share against ε; this network is not a classifier"
                               " (one output), so there is none")
    if "curve" in local:
        return local["curve"]
    n = local["n_points"]
    return [{"radius": local["radius"], "radius_given": None, "radius_relative": None, "n_points": n,
             **{f"{v}_fraction": (local.get(k) or 0) / n for v, k in (("certified", "n_certified"),
                                                                      ("refuted", "n_refuted"),
                                                                      ("undecided", "n_undecided"))}}]


def plot_certify_curve(report: dict, path: str | Path, title: str = "") -> Path:
    """Certified / refuted (verified) / undecided shares against ε, from a shrink report (`shrink --plot`)."""
    curve = sorted(curve_of(report.get("pruning", {}).get("local")), key=lambda e: e["radius"])
    relative = all(e.get("radius_relative") is not None for e in curve)
    xs = [100 * e["radius_relative"] if relative else e["radius"] for e in curve]
    fig = new_figure()
    ax = fig.add_subplot()
    styles = (("certified", "tab:green", "o", "certified: top-1 proven unchanged in the ball"),
              ("refuted", "tab:red", "s", "refuted: a verified point where top-1 differs"),
              ("undecided", "tab:grey", "^", "undecided"))
    for verdict, colour, marker, label in styles:
        ax.plot(xs, [100 * (e[f"{verdict}_fraction"] or 0) for e in curve], color=colour, marker=marker, label=label)
    ax.plot(xs, [100 * (1 - (e["refuted_fraction"] or 0)) for e in curve], color="tab:green", linestyle=":",
            label="ceiling of any sound certificate (100% − refuted)")
    ax.set_xlabel("ε, % of the median input norm" if relative else "ε (absolute radius)")
    ax.set_ylabel(f"% of the {curve[0]['n_points']} points")
    ax.set_ylim(-3, 103)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    shrunk = f", {report['params_after']:,} of {report['params_before']:,} parameters" if "params_after" in report \
        else ""
    ax.set_title(title or f"Local certificates against ε{shrunk}")
    fig.tight_layout()
    return write_png(fig, path)


# --- a sweep over budgets ----------------------------------------------------------------------------------------
def plot_sweep(result: dict, path: str | Path, title: str = "") -> Path:
    """Accuracy (or agreement) and the certified top-1 share against parameters (log axis), ONNX kB on the right
    axis, the chosen budget circled (`sweep --plot`)."""
    rows = sorted((r for r in result["rows"] if r["reachable"]), key=lambda r: r["params"])
    if not rows:
        raise IsocompressError(f"{path}: no budget of the sweep was reachable; nothing to plot")
    fig = new_figure((9, 5))
    ax = fig.add_subplot()
    xs = [r["params"] for r in rows]
    accuracy = any(r.get("accuracy") is not None for r in rows)
    quality = "accuracy" if accuracy else "top1_agreement"
    series = ((quality, "tab:blue", "o", f"{'accuracy' if accuracy else 'top-1 agreement'} ({rows[0]['measured_on']})"),
              ("certified_top1", "tab:green", "s", f"certified top-1 share at ε = {rows[0]['certify_radius'] or 0:.3g}"))
    for key, colour, marker, label in series:
        pts = [(x, 100 * r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), color=colour, marker=marker, label=label)
    names: dict[int, list[str]] = {}  # budgets that reach the same size share one label
    for x, r in zip(xs, rows):
        names.setdefault(x, []).append(r["budget"])
    for x, budgets in names.items():
        ax.annotate(", ".join(budgets), (x, 0), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize="small")
    right = ax.twinx()
    right.plot(xs, [r["onnx_bytes"] / 1000 for r in rows], color="tab:orange", linestyle="--", marker="^",
               label="ONNX file (kB)")
    right.set_ylabel("ONNX file, kB")
    chosen = result.get("chosen")
    if chosen is not None:
        r = result["rows"][chosen]
        ax.axvline(r["params"], color="black", linewidth=1, linestyle=":",
                   label=f"smallest meeting the limits: {r['budget']}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters after shrinking (log scale)")
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()
    extra = right.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left", bbox_to_anchor=(1.12, 1.0),
              borderaxespad=0.0, fontsize="small")
    ax.set_title(title or f"{Path(result['model']).name}: a sweep over budgets")
    fig.tight_layout()
    return write_png(fig, path)
