"""The deployed network's distance from the float64 network it was written from (docs/bounds.md §5b).

The files `shrink` and `export` write are not the float64 model: their weights are rounded to float32 or float16, or
quantised to int8 with float32 scales, and onnxruntime (or isocompress's float32 reload) computes in float32 or
float16. The rounded/quantised tensors are the deployed network's weights *exactly*; so the distance is a
weight-perturbation bound (Lemma 11: a Lipschitz chain for two networks of the same shape with weight differences
ΔW_l, Δb_l, Δpsi_l, Δo_l) plus the arithmetic's rounding by standard forward error analysis (γ_n on every dot
product, the activation's evaluation error). By the triangle inequality the certified bounds of pruning plus this
term bound the deployed network against the original. MLPs (vectors) with tanh activations only.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from isocompress.bounds.certified import SLOPE_MAX, gain, m_range, reachable_balls, slope_sup, vec_norm
from isocompress.core import precision as P
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import spectral_norm_upper

F64 = torch.float64
DH_DO = SLOPE_MAX / 2 + 1e-6  # sup |∂h/∂o| = sup |G'(μ)||z| ≤ sup |g'(m)|/2 (Lemma 11)
DG_DO = 1.0 / 3.0 + 1e-9  # sup |∂g/∂o| = |G'(0)| = 1/3 (|G'| is decreasing: Lemma 8)
EXTRA_TERMS = 4  # a dot product's length beyond n_in: the carried coordinate, psi, the bias and the psi/g Mul


def supported(model: IsoMLP) -> bool:
    """Whether the deployed bound is derived for this network: a tanh MLP (vectors) with every o ≥ 0 (Lemma 11)."""
    return model.is_mlp and all(layer.sigma == "tanh" and float(layer.o) >= 0 for layer in model.layers[:-1])


def deployed_layer(layer: Layer, plan: P.Plan) -> Layer:
    """The layer as the safetensors file stores it and isocompress reloads it (float64 holding the stored values):
    dense weights per `plan.weights` (int8: fl32(q·s), what DequantizeLinear computes), the rest in float32."""
    if layer.kind == "dense" and plan.weights == "int8":
        weight = P.dequantize_rows(*P.quantize_rows(layer.weight))
    else:
        weight = P.round_to(layer.weight, plan.weights if layer.kind == "dense" else stored_dtype(plan))
    r = (lambda t: None if t is None else P.round_to(t, stored_dtype(plan)))
    return replace(layer, weight=weight, bias=r(layer.bias), psi=r(layer.psi), o=r(layer.o))


def stored_dtype(plan: P.Plan) -> str:
    """What the safetensors file stores diagonals, biases, psi and o in: float32 (float64 for a float64 file)."""
    return "float64" if plan.precision == "float64" else "float32"


def deployed_model(model: IsoMLP, plan: P.Plan) -> IsoMLP:
    return IsoMLP([deployed_layer(layer, plan) for layer in model.layers])


def _max_rounding(t: torch.Tensor | None, dtypes: set[str]) -> torch.Tensor | None:
    """Elementwise max over the representations of |fl_d(t) − t| (the files store the same tensor in each)."""
    if t is None:
        return None
    return torch.stack([(P.round_to(t, d) - t).abs() for d in sorted(dtypes)]).amax(dim=0)


def layer_perturbation(layer: Layer, plan: P.Plan) -> dict:
    """Bounds on |ΔW| (operator norm), |Δb|, |Δpsi|, |Δo| between the float64 layer and every deployed form of it: the
    safetensors reload (`deployed_layer`) and the ONNX graph's tensors (others in `plan.others`, o folded as a
    carried coordinate ã = fl(sqrt(fl(o))) with ã² = o(1 + θ), |θ| ≤ γ_3, psi folded as fl(psi/ã) times fl(g̃ ã))."""
    others = {plan.others, stored_dtype(plan)}
    u = max(P.UNIT_ROUNDOFF[d] for d in others | {plan.compute})
    stored = deployed_layer(layer, plan)
    if layer.kind == "dense":
        dw = spectral_norm_upper(stored.weight - layer.weight)
    else:
        dw = float(_max_rounding(layer.weight, others).max())
    db = float(torch.linalg.vector_norm(_max_rounding(layer.bias, others)))
    dpsi = 0.0
    if layer.psi is not None:
        dpsi = float(torch.linalg.vector_norm(_max_rounding(layer.psi, others)))
        dpsi += P.gamma(2, u) * float(torch.linalg.vector_norm(layer.psi))  # the folded column
    do = 0.0 if layer.o is None else P.gamma(3, u) * abs(float(layer.o)) + P.UNDERFLOW["float32"]
    return {"weight": dw, "bias": db, "psi": dpsi, "o": do}


def _abs_norm(weight: torch.Tensor) -> float:
    """‖|W|‖₂ (the γ term's matrix; max |d| for a diagonal)."""
    return spectral_norm_upper(weight.abs()) if weight.dim() >= 2 else float(weight.abs().max())


def _op_norm(weight: torch.Tensor) -> float:
    return spectral_norm_upper(weight) if weight.dim() >= 2 else float(weight.abs().max())


def activation_errors(n: int, plan: P.Plan, z_bound: float) -> tuple[float, float]:
    """(ε_h, ε_g): |h̃ − f(z̃)| ≤ ε_h and |g̃ − g(z̃)| ≤ ε_g for the computed activation of a computed z̃ (|z̃| ≤
    z_bound, n coordinates): m² by a sum of squares (γ_{n+2}, Sqrt one more u), tanh with relative error TANH_REL,
    Div and the product g·z one u each, underflow absolute (Lemma 12)."""
    c = plan.compute
    u, uf, tau = P.UNIT_ROUNDOFF[c], P.UNDERFLOW[c], P.TANH_REL[c]
    phi = P.gamma(n + 3, u)  # relative error of m̃ (m² to γ_{n+2}, then the square root): |m̃/m − 1| ≤ φ
    if phi >= 0.5:
        return math.inf, math.inf
    g_rel = (1 + phi / (1 - phi) ** 2) * (1 + tau) * (1 + u) - 1
    g_abs = ((n + 3) * uf + m2_floor(c)) * DG_DO  # underflow of the squares, and the m² floor, through |∂g/∂μ| ≤ 1/3
    eps_g = g_rel + g_abs
    eps_h = (g_rel + (1 + g_rel) * u) + z_bound * g_abs * (1 + u) + math.sqrt(n) * uf
    return eps_h, eps_g


def m2_floor(compute: str) -> float:
    """The floor of m² in the graph where o < that floor (export.onnx_export): 1e-30, or 2^-24 in float16."""
    return 2.0 ** -24 if compute == "float16" else 1e-30


def deployed_bound(model: IsoMLP, plan: P.Plan, input_norm: float) -> dict:
    """sup over |x| ≤ input_norm of |y_deployed(x) − y(x)|, y the float64 `model` (Lemma 11 + Lemma 12), for every
    deployed form: the ONNX file run by onnxruntime and the safetensors file reloaded and run in float32 (float16
    compute: the ONNX graph). Also whether an intermediate could overflow the compute dtype."""
    c = plan.compute
    u, uf = P.UNIT_ROUNDOFF[c], P.UNDERFLOW[c]
    limit = P.FLOAT_MAX.get(c, math.inf)
    h_exact, dh, dg = float(input_norm), float(input_norm) * u, 0.0  # the input cast to the compute dtype
    h_tilde, g_tilde, g_exact = h_exact * (1 + u), 0.0, 0.0
    overflow, rows = input_norm >= limit, []
    balls = reachable_balls([la.as_dense() for la in model.layers], float(input_norm))  # the float64 network's reachable set (Lemma 3)
    for i, layer in enumerate(model.layers):
        pert = layer_perturbation(layer, plan)
        stored = deployed_layer(layer, plan)
        n = layer.n_in + EXTRA_TERMS
        psi_norm = 0.0 if stored.psi is None else float(torch.linalg.vector_norm(stored.psi))
        terms = _abs_norm(stored.weight) * h_tilde + float(torch.linalg.vector_norm(stored.bias)) + psi_norm * g_tilde
        arith = P.gamma(n, u) * terms + math.sqrt(layer.n_out) * n * uf
        dz = (_op_norm(stored.weight) * dh + pert["weight"] * h_exact + pert["bias"] + psi_norm * dg
              + pert["psi"] * g_exact + arith)
        z_bound = terms * (1 + P.gamma(n, u))
        o = 0.0 if layer.o is None else abs(float(layer.o))
        overflow = overflow or z_bound >= limit or (o + z_bound ** 2) * 1.01 >= limit
        row = {"layer": i, "delta_weight": pert["weight"], "delta_bias": pert["bias"], "delta_psi": pert["psi"],
               "delta_o": pert["o"], "arithmetic": arith, "dz": dz}
        rows.append(row)
        if layer.is_output:
            return {"bound": math.inf if overflow else dz, "overflow_possible": overflow, "input_norm": input_norm,
                    "plan": plan.describe(), "layers": rows}
        eps_h, eps_g = activation_errors(layer.n_out + 1, plan, z_bound)
        ball = balls[i]  # z ∈ B(c, r) and z̃ within dz of it: both in B(c, r + dz), where m ≥ m_lo (Lemma 1, 2)
        m_lo = m_range(vec_norm(ball.z_center), ball.z_radius + dz, max(float(layer.o), 0.0))[0]
        dh = min(gain(m_lo) * (1 + 1e-12) * dz + eps_h + DH_DO * pert["o"], 2.0 + eps_h)
        dg = min(slope_sup(m_lo) * dz + eps_g + DG_DO * pert["o"], 1.0 + eps_g)
        row.update(eps_h=eps_h, eps_g=eps_g, dh=dh, dg=dg, m_lo=m_lo)
        h_exact = min(1.0, vec_norm(ball.h_center) + ball.h_radius)
        g_exact = min(1.0, float(ball.g_mid + ball.g_half))
        h_tilde, g_tilde = h_exact + eps_h + dh, min(1.0 + eps_g, g_exact + dg)
    raise AssertionError("a validated model ends with an output layer")


def choose_plan(model: IsoMLP, precision: str, input_norm: float | None) -> P.Plan:
    """The plan of a precision; float16 computes in float16 only where no intermediate can overflow (|x| ≤
    input_norm; without a domain, float16 weights are cast to float32)."""
    if precision != "float16":
        return P.plan_for(precision) if precision != "float64" else P.Plan("float64", "float64", "float64", "float64")
    if input_norm is None or not supported(model):
        return P.plan_for("float16", False, "no input domain to prove that float16 cannot overflow: the float16 weights"
                          " are cast to float32 in the graph" if input_norm is None else
                          "float16 compute is not analysed for this network: weights cast to float32")
    trial = deployed_bound(model, P.plan_for("float16", True), input_norm)
    if trial["overflow_possible"] or not math.isfinite(trial["bound"]):
        return P.plan_for("float16", False, f"float16 could overflow for |x| ≤ {input_norm:.4g} (a pre-activation or"
                          " m² may exceed 65504): the float16 weights are cast to float32 in the graph")
    edges = deployed_bound(model, P.plan_for("float16", False), input_norm)["bound"]
    if trial["bound"] > COMPUTE16_MAX_GROWTH * edges:
        return P.plan_for("float16", False, f"float16 arithmetic would raise the certified rounding bound from"
                          f" {edges:.3g} to {trial['bound']:.3g} (|x| ≤ {input_norm:.4g}): the float16 weights are cast"
                          " to float32 in the graph")
    return P.plan_for("float16", True)


COMPUTE16_MAX_GROWTH = 2.0  # float16 compute only where it at most doubles the certified bound of float32 compute


COVERS = {
    "float64": "float64 ONNX as run by onnxruntime and the saved float64 safetensors",
    "float32": "float32 ONNX as run by onnxruntime and the saved float32 safetensors (reloaded and run in float32)",
    "float16": "the float16 ONNX as run by onnxruntime and the saved float16 safetensors (reloaded in float32)",
    "int8-weights": "the int8-weights ONNX (DequantizeLinear) as run by onnxruntime and the saved int8 safetensors"
                    " (isocompress reloads fl32(q·s))",
}


# --- per-point bounds (docs/bounds.md §5b, "Local form") ---------------------------------------------------------
def local_deployed_bound(model: IsoMLP, plan: P.Plan, centres: torch.Tensor, eps: float) -> torch.Tensor:
    """D_i ≥ sup over |x − x_i| ≤ ε of |y_deployed(x) − y(x)| for every centre: Lemma 11 carried by the forms of
    §8 (bounds.local): ΔW h keeps its linear part ΔW(c_h + A_h δ) through every later layer's Jacobian at the centre,
    instead of ‖ΔW‖·1 times the norm product; the arithmetic, bias, psi and o terms of Lemma 12 enter as balls. Never
    above the global bound over |x| ≤ max |x_i| + ε (the minimum is returned)."""
    x = centres.to(F64)
    norm = float(torch.linalg.vector_norm(x, dim=-1).max()) + eps
    glob = deployed_bound(model, plan, norm)
    if not math.isfinite(glob["bound"]):
        return torch.full((len(x),), math.inf, dtype=F64)
    layers = [layer.as_dense() for layer in model.layers]
    stored = [deployed_layer(layer, plan).as_dense() for layer in model.layers]
    chunk = max(1, int(FORM_ENTRIES // (max(model.widths) * model.widths[0])))  # forms are points × width × n_0
    parts = [_local_chunk(model, layers, stored, glob, part, eps, norm) for part in x.split(chunk)]
    return torch.minimum(torch.cat(parts), torch.tensor(glob["bound"], dtype=F64))


FORM_ENTRIES = 2e7  # float64 entries of one form's linear parts per chunk of centres (160 MB)


def _local_chunk(model: IsoMLP, layers, stored, glob: dict, x: torch.Tensor, eps: float, norm: float) -> torch.Tensor:
    from isocompress.bounds import local as L

    plan = P.Plan.from_record(glob["plan"])
    rows, p, ball = glob["layers"], len(x), eps
    eps = L.Domain(float(ball))  # the ball |x − x_i| ≤ ε (forms' a_norm: sup |A δ| over it, ε‖A‖)
    w0, dw0 = layers[0].weight, stored[0].weight - layers[0].weight
    z = L.Form(x @ w0.T + layers[0].bias, w0.expand(p, *w0.shape), torch.zeros(p, dtype=F64),
               torch.full((p,), ball * L.spectral_norm(w0), dtype=F64))
    ball0 = _op_norm(stored[0].weight) * P.UNIT_ROUNDOFF[plan.compute] * norm + rows[0]["arithmetic"] \
        + rows[0]["delta_bias"]
    dz = L.Form(x @ dw0.T, dw0.expand(p, *dw0.shape), torch.full((p,), ball0, dtype=F64),
                torch.full((p,), ball * spectral_norm_upper(dw0), dtype=F64))
    for i in range(1, len(layers)):
        h, g, dh, dg = L.activation(z, dz, float(layers[i - 1].o), eps)
        row = rows[i - 1]
        dh = _widened(dh, row["eps_h"] + DH_DO * row["delta_o"])
        dg = L.Scalar(dg.c, dg.a, dg.r + row["eps_g"] + DG_DO * row["delta_o"])
        z, _ = L.affine(layers[i], h, g, dh, dg, torch.zeros(layers[i].n_out, dtype=torch.bool),
                        torch.zeros(layers[i].n_out, dtype=F64), eps)
        dz = _perturbed_affine(layers[i], stored[i], h, g, dh, dg, rows[i], eps, model.layers[i].kind)
    return dz.sup(eps)


def _widened(form, extra: float):
    """The form with `extra` more in its remainder ball (and in its residue's ball: both bound the same w)."""
    from isocompress.bounds import local as L

    res = None if form.res is None else L.Residue(form.res.vecs, form.res.mats, form.res.r0 + extra)
    return L.Form(form.c, form.A, form.r + extra, res=res)


def _perturbed_affine(layer: Layer, stored: Layer, h, g, dh, dg, row: dict, eps: float, kind: str):
    """Δz = W̃ Δh + ΔW h + Δb + psĩ Δg + Δpsi g + e (Lemma 11) as a form: W̃Δh and ΔW h exactly in their linear parts,
    Δb, Δpsi·g (all representations, so as balls) and the arithmetic e as balls. For a diagonal layer whose ONNX
    form is rounded otherwise than the file's (float16 compute), the other rounding is a ball too."""
    from isocompress.bounds import local as L

    wt, dw = stored.weight, stored.weight - layer.weight
    dc = dh.c @ wt.T + h.c @ dw.T
    da = torch.matmul(wt, dh.A) + torch.matmul(dw, h.A)
    dr = _op_norm(wt) * dh.r + spectral_norm_upper(dw) * h.r + row["delta_bias"] + row["arithmetic"]
    if layer.psi is not None:
        psi = stored.psi
        dc = dc + psi[None, :] * dg.c[:, None]
        da = da + psi[None, :, None] * dg.a[:, None, :]
        dr = dr + float(torch.linalg.vector_norm(psi)) * dg.r + row["delta_psi"] * torch.clamp(g.sup(eps), max=1.0)
    if kind != "dense":  # the ONNX graph may store this diagonal in plan.others (another rounding)
        dr = dr + 2.0 * row["delta_weight"]
    return L.Form(dc, da, dr)
