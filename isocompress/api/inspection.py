"""`isocompress inspect`: what each layer of a model looks like and how far `--exact` would shrink it.

`inspect_model` returns a plain dict (the `--json` output); `plot_spectra` draws every layer's singular values on one
log-scale figure (matplotlib is the optional extra `isocompress[plot]`, imported only here).

Two ranks per layer:
  * `rank`: the numerical rank of the layer's own weight matrix (as numpy.linalg.matrix_rank counts it);
  * `varying_rank` (hidden layers only): the dimension of the part of z_l that varies with the input, i.e. the rank
    chain of docs/math.md ("Exact removal"): the width hidden space l keeps after every constant direction before and in
    it has been removed. It can be far below `rank` (12→256→256 has rank 256 but varying rank 13 in hidden space 1:
    W_2 only ever sees a 12-dimensional image plus the psi direction), and it is exactly the width `shrink --exact`
    gives that hidden space.
"""

from __future__ import annotations

from pathlib import Path

import torch

from isocompress.api.plotting import check_plot_path, require_matplotlib, write_png
from isocompress.core.errors import IsocompressError
from isocompress.core.layers import as_float64
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import numerical_rank

DEFAULT_THRESHOLD = 1e-3


def singular_values(layer: Layer) -> torch.Tensor:
    """Descending singular values of the layer's weight (float64; of the reshaped kernel M = C_out × C_in·k for a
    convolution). A rectangular diagonal's are |d| sorted."""
    if layer.kind == "diag":
        return layer.weight.to(torch.float64).abs().sort(descending=True).values
    return torch.linalg.svdvals(layer.matrix().to(torch.float64))


def layer_record(i: int, layer: Layer, threshold: float, varying_rank: int | None) -> dict:
    s = singular_values(layer)
    return {
        "index": i,
        "kind": layer.kind,
        "shape": [layer.n_out, layer.n_in],
        "geometry": layer.geometry.describe(),
        "out_spatial": list(layer.geometry.out_spatial),
        "params": layer.num_params(),
        "flops": layer.flops(),
        "sigma_max": float(s[0]),
        "sigma_min": float(s[-1]),
        "n_below_threshold": int((s < threshold).sum()),
        "n_singular_values": int(s.numel()),
        "rank": numerical_rank(s, tuple(layer.matrix().shape)),
        # Only a hidden space's constant directions can be removed exactly, so the output layer has none.
        "varying_rank": varying_rank,
        "o": None if layer.o is None else float(layer.o),
        "activation": None if layer.o is None else layer.sigma,
        "psi_norm": None if layer.psi is None else float(torch.linalg.vector_norm(layer.psi.to(torch.float64))),
        "singular_values": s.tolist(),
    }


def inspect_model(model: IsoMLP, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Per-layer spectra and ranks, the parameter count, and what `shrink --exact` would reach (computed by running
    `api.shrink_exact` itself, so the prediction is what shrinking gives)."""
    if not threshold >= 0:
        raise IsocompressError(f"--threshold {threshold!r} must be ≥ 0")
    from isocompress.exact.shrink import shrink_exact

    model = as_float64(model)
    exact = shrink_exact(model)
    hidden_widths = exact.widths[1:-1]  # diagonalising never changes a width: these are the varying ranks
    return {
        "input_shape": list(model.input_shape),
        "widths": list(model.widths),
        "params": model.num_params(),
        "flops": model.flops(),
        "threshold": threshold,
        "layers": [layer_record(i, layer, threshold, hidden_widths[i] if i < len(hidden_widths) else None)
                   for i, layer in enumerate(model.layers)],
        "exact": {
            "widths": list(exact.widths),
            "kinds": [layer.kind for layer in exact.layers],
            "params": exact.num_params(),
            "flops": exact.flops(),
            "fraction": exact.num_params() / model.num_params(),
        },
    }


def format_inspection(report: dict) -> str:
    """An aligned, human-readable table of `inspect_model`'s dict."""
    header = ("layer", "kind", "channels", "geometry", "params", "FLOPs", "σ_max", "σ_min",
              f"#σ<{report['threshold']:g}", "rank", "varying rank", "o", "|psi|")
    rows = [header] + [_row(layer) for layer in report["layers"]]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    exact = report["exact"]
    shape = report.get("input_shape", [])
    lead = f"input {'×'.join(map(str, shape))}; " if len(shape) > 1 else ""
    lines.append(f"{lead}widths {'→'.join(map(str, report['widths']))}; {report['params']:,} parameters,"
                 f" {report['flops']:,} FLOPs")
    lines.append(
        f"--exact would reach widths {'→'.join(map(str, exact['widths']))} ({','.join(exact['kinds'])}),"
        f" {exact['params']:,} parameters ({100 * exact['fraction']:.2f}%), {exact['flops']:,} FLOPs"
    )
    return "\n".join(lines)


def _row(layer: dict) -> tuple[str, ...]:
    def opt(value, fmt):
        return "-" if value is None else format(value, fmt)

    return (
        str(layer["index"]), layer["kind"], f"{layer['shape'][1]}→{layer['shape'][0]}", layer["geometry"],
        f"{layer['params']:,}", f"{layer['flops']:,}",
        f"{layer['sigma_max']:.4g}", f"{layer['sigma_min']:.4g}",
        f"{layer['n_below_threshold']}/{layer['n_singular_values']}", str(layer["rank"]),
        opt(layer["varying_rank"], "d"), opt(layer["o"], ".4g"), opt(layer["psi_norm"], ".4g"),
    )


def plot_spectra(report: dict, path: str | Path, title: str = "") -> Path:
    """Draw `spectra_figure` into the PNG file `path` (written atomically)."""
    path = check_plot_path(path)  # before drawing: a bad path fails at once
    return write_png(spectra_figure(report, title), path)


LINE_STYLES = ("-", "--", "-.", ":")


def mark_varying_rank(ax, layer: dict, s: torch.Tensor, colour, first: bool) -> None:
    """The cut `shrink --exact` makes in hidden space i: a cross on layer i's spectrum at j = its varying rank r, and a
    short vertical tick between j = r and r + 1 (what lies right of it is constant on every input and is removed;
    r can exceed the spectrum's length, 12→256→256's 13 with the psi direction: then the cross sits at its end)."""
    r = layer.get("varying_rank")
    if r is None or s.numel() == 0:
        return
    j = min(r, s.numel())
    ax.plot([j], [float(s[j - 1])], marker="X", markersize=9, color=colour, linestyle="none",
            markeredgecolor="black", markeredgewidth=0.6, gid=f"varying-rank-cut-{layer['index']}",
            label="varying-rank cut (the width --exact keeps)" if first else None)
    ax.axvline(j + 0.5, color=colour, linewidth=0.8, alpha=0.5, linestyle=(0, (2, 2)),
               gid=f"varying-rank-tick-{layer['index']}")


def spectra_figure(report: dict, title: str = ""):
    """One log-scale line per layer: σ_j against j, the threshold dashed, the legend outside the axes (it never hides
    data). Layers take turns of line style as well as colour, so two layers with near-equal spectra stay
    distinguishable. Values at or below a floor 1e-16·σ_max (zeros and rounding noise; a log axis cannot show 0) are
    drawn at the floor and the legend says how many. matplotlib's object API: no pyplot, no global backend switch."""
    Figure, FigureCanvasAgg = require_matplotlib()
    top = max(layer["sigma_max"] for layer in report["layers"])
    floor = top * 1e-16 if top > 0 else 1e-16
    fig = Figure(figsize=(11, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n, layer in enumerate(report["layers"]):
        s = torch.tensor(layer["singular_values"], dtype=torch.float64)
        zeros = int((s <= floor).sum())
        label = f"layer {layer['index']}: {layer['kind']} {layer['shape'][0]}×{layer['shape'][1]}"
        if layer.get("varying_rank") is not None:
            label += f", varying rank {layer['varying_rank']}"
        label += f", {zeros} ≤ {floor:.1e} (drawn there)" if zeros else ""
        (line,) = ax.plot(range(1, s.numel() + 1), s.clamp_min(floor).tolist(),
                          linestyle=LINE_STYLES[n % len(LINE_STYLES)], linewidth=1.6,
                          marker="o" if s.numel() <= 64 else None, markersize=3, label=label)
        mark_varying_rank(ax, layer, s.clamp_min(floor), line.get_color(), first=n == 0)
    if report["threshold"] > 0:
        ax.axhline(report["threshold"], color="grey", linestyle=(0, (4, 4)), linewidth=1,
                   label=f"threshold {report['threshold']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("index j (singular values in descending order, 1 = largest)")
    ax.set_ylabel(r"singular value $\sigma_j$ (log scale)")
    ax.set_title(title or f"Singular-value spectra, widths {'→'.join(map(str, report['widths']))}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    fig.tight_layout()
    return fig
