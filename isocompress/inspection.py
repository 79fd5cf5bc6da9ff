"""`isocompress inspect`: what each layer of a model looks like and how far `--exact` would shrink it.

`inspect_model` returns a plain dict (the `--json` output); `plot_spectra` draws every layer's singular values on one
log-scale figure (matplotlib is the optional extra `isocompress[plot]`, imported only here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from isocompress.errors import IsocompressError
from isocompress.layers import as_float64, varying_basis
from isocompress.model import IsoMLP, Layer

DEFAULT_THRESHOLD = 1e-3


def singular_values(layer: Layer) -> torch.Tensor:
    """Descending singular values of the layer's weight (float64). A rectangular diagonal's are |d| sorted."""
    if layer.kind == "diag":
        return layer.weight.to(torch.float64).abs().sort(descending=True).values
    return torch.linalg.svdvals(layer.weight.to(torch.float64))


def layer_record(i: int, layer: Layer, threshold: float) -> dict:
    s = singular_values(layer)
    return {
        "index": i,
        "kind": layer.kind,
        "shape": [layer.n_out, layer.n_in],
        "params": layer.num_params(),
        "sigma_max": float(s[0]),
        "sigma_min": float(s[-1]),
        "n_below_threshold": int((s < threshold).sum()),
        "n_singular_values": int(s.numel()),
        # Only a hidden space's constant directions can be removed exactly, so the output layer has none.
        "varying_rank": None if layer.is_output else int(varying_basis(layer).shape[1]),
        "o": None if layer.o is None else float(layer.o),
        "psi_norm": None if layer.psi is None else float(torch.linalg.vector_norm(layer.psi.to(torch.float64))),
        "singular_values": s.tolist(),
    }


def inspect_model(model: IsoMLP, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Per-layer spectra and ranks, the parameter count, and what `shrink --exact` would reach."""
    from isocompress.api import shrink_exact

    if not threshold >= 0:
        raise IsocompressError(f"--threshold {threshold!r} must be ≥ 0")
    model = as_float64(model)
    exact = shrink_exact(model)
    return {
        "widths": list(model.widths),
        "params": model.num_params(),
        "threshold": threshold,
        "layers": [layer_record(i, layer, threshold) for i, layer in enumerate(model.layers)],
        "exact": {
            "widths": list(exact.widths),
            "kinds": [layer.kind for layer in exact.layers],
            "params": exact.num_params(),
            "fraction": exact.num_params() / model.num_params(),
        },
    }


def format_inspection(report: dict) -> str:
    """An aligned, human-readable table of `inspect_model`'s dict."""
    header = ("layer", "kind", "shape", "params", "σ_max", "σ_min", f"#σ<{report['threshold']:g}", "varying rank", "o",
              "|psi|")
    rows = [header] + [_row(layer) for layer in report["layers"]]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    exact = report["exact"]
    lines.append(f"widths {'→'.join(map(str, report['widths']))}; {report['params']:,} parameters")
    lines.append(
        f"--exact would reach widths {'→'.join(map(str, exact['widths']))} ({','.join(exact['kinds'])}),"
        f" {exact['params']:,} parameters ({100 * exact['fraction']:.2f}%)"
    )
    return "\n".join(lines)


def _row(layer: dict) -> tuple[str, ...]:
    def opt(value, fmt):
        return "-" if value is None else format(value, fmt)

    return (
        str(layer["index"]), layer["kind"], f"{layer['shape'][0]}×{layer['shape'][1]}", f"{layer['params']:,}",
        f"{layer['sigma_max']:.4g}", f"{layer['sigma_min']:.4g}",
        f"{layer['n_below_threshold']}/{layer['n_singular_values']}",
        opt(layer["varying_rank"], "d"), opt(layer["o"], ".4g"), opt(layer["psi_norm"], ".4g"),
    )


def plot_spectra(report: dict, path: str | Path, title: str = "") -> Path:
    """One log-scale line per layer: σ_j against j, the threshold dashed. Zeros are drawn at a floor (a log axis
    cannot show 0) and the legend says how many. Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise IsocompressError("--plot needs matplotlib; install isocompress[plot] (pip install 'isocompress[plot]')") from None
    from isocompress.io import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise IsocompressError(f"{path}: --plot writes a PNG; give a file name ending in .png")
    top = max(layer["sigma_max"] for layer in report["layers"])
    floor = max(top, 1e-300) * 1e-16
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for layer in report["layers"]:
        s = torch.tensor(layer["singular_values"], dtype=torch.float64)
        zeros = int((s <= floor).sum())
        label = f"layer {layer['index']} ({layer['kind']} {layer['shape'][0]}×{layer['shape'][1]})"
        label += f", {zeros} at floor" if zeros else ""
        ax.plot(range(1, s.numel() + 1), s.clamp_min(floor).tolist(), marker="." if s.numel() <= 64 else None,
                label=label)
    ax.axhline(report["threshold"], color="grey", linestyle="--", linewidth=1,
               label=f"threshold {report['threshold']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("index j (singular values in descending order)")
    ax.set_ylabel("singular value σ_j")
    ax.set_title(title or f"Singular-value spectra, widths {'→'.join(map(str, report['widths']))}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as exc:
        raise IsocompressError(f"{path}: cannot write the plot ({exc.strerror}); choose another path") from None
    finally:
        plt.close(fig)
    return path
