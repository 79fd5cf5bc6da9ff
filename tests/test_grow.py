"""Neurogenesis and auto-neuroadaptation (issue 6): exactness, round trips, training, the `grow` command."""

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.exact.shrink import shrink_exact
from isocompress.formats import io
from isocompress.train.grow import count_scaffold, direction_strengths, grow, neuroadapt, remove_weakest_directions
from isocompress.train.nn import IsotropicMLP

F64 = torch.float64


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def same_function(a, b, x, tol=1e-12) -> bool:
    with torch.no_grad():
        return relative_error(a(x), b(x)) <= tol


MODELS = {
    "plain": lambda: random_model([5, 12, 12, 12, 3], seed=1),
    "psi_and_o": lambda: random_model([5, 12, 12, 12, 3], psi=True, o=(0.1, 2.0), seed=2),
    "diagonal": lambda: shrink_exact(random_model([6, 20, 20, 20, 4], psi=True, o=(0.0, 1.0), seed=3)),
}


# --- grow --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_grow_is_exact_in_float64(kind, f64_inputs):
    model = MODELS[kind]()
    x = f64_inputs(model.widths[0])
    for i in range(len(model.layers) - 1):
        grown = grow(model, i, 4, scale=0.1, seed=i)
        assert grown.widths[i + 1] == model.widths[i + 1] + 4
        assert same_function(grown, model, x, 1e-12)


@pytest.mark.parametrize("kind", MODELS)
def test_grow_is_exact_in_float32(kind, f64_inputs):
    model = MODELS[kind]()
    x = f64_inputs(model.widths[0]).to(torch.float32)
    grown = grow(model, 1, 7, scale=0.1).cast(torch.float32)
    assert same_function(grown, model.cast(torch.float32), x, 1e-5)


def test_grown_neurons_are_scaffolds():
    model = MODELS["psi_and_o"]()
    grown = grow(model, 1, 3, scale=0.01, seed=7)
    producer, consumer = grown.layers[1], grown.layers[2]
    assert torch.equal(producer.weight[:12], model.layers[1].weight)
    assert not producer.weight[12:].any() and not producer.bias[12:].any() and not producer.psi[12:].any()
    outgoing = consumer.weight[:, 12:]
    assert outgoing.abs().min() > 0 and outgoing.std() == pytest.approx(0.01, rel=0.7)
    assert torch.equal(producer.o, model.layers[1].o)
    assert torch.equal(grow(model, 1, 3, scale=0.01, seed=7).layers[2].weight, consumer.weight)  # deterministic


def test_grow_leaves_its_argument_untouched():
    model = MODELS["plain"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grow(model, 0, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shrink_grow_shrink_round_trips(f64_inputs):
    shrunk = shrink_exact(MODELS["psi_and_o"]())
    x = f64_inputs(shrunk.widths[0])
    for i in range(len(shrunk.layers) - 1):
        again = shrink_exact(grow(shrunk, i, 5, scale=0.3, seed=i))
        assert again.widths == shrunk.widths
        assert same_function(again, shrunk, x, 1e-12)


@given(
    widths=st.lists(st.integers(1, 10), min_size=3, max_size=5),
    k=st.integers(1, 6),
    psi=st.booleans(),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_grow_is_exact_property(widths, k, psi, seed, data):
    model = random_model(widths, psi=psi, o=(0.0, 1.0), seed=seed)
    if data.draw(st.booleans(), label="shrink first"):
        model = shrink_exact(model)
    i = data.draw(st.integers(0, len(model.layers) - 2), label="hidden space")
    x = torch.randn(32, model.widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    x = x * torch.logspace(-3, 3, 32, dtype=F64)[:, None]
    grown = grow(model, i, k, scale=1.0, seed=seed)
    assert grown.widths[i + 1] == model.widths[i + 1] + k
    assert same_function(grown, model, x, 1e-12)


def test_grow_rejects_bad_arguments():
    model = MODELS["plain"]()
    with pytest.raises(IsocompressError, match="hidden space 3 does not exist.*0..2"):
        grow(model, 3, 1)
    with pytest.raises(IsocompressError, match="≥ 1, got 0"):
        grow(model, 0, 0)
    with pytest.raises(IsocompressError, match="scale"):
        grow(model, 0, 1, scale=float("nan"))


# --- training a grown network ------------------------------------------------------------------------------------
def test_grown_network_trains_and_scaffolds_move():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=gen)
    y = (x @ torch.randn(4, 3, generator=gen)).argmax(dim=1)  # three classes split by planes
    base = IsotropicMLP([4, 6, 6, 3], psi=True, intrinsic_length="trainable", seed=0).to_isomlp()
    grown = grow(base, 0, 3, scale=0.1, seed=1)
    net = IsotropicMLP.from_isomlp(grown, intrinsic_length="trainable")
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    incoming = net.layers[0].weight.detach()[6:]
    assert (incoming.norm(dim=1) > 0.05).all(), incoming  # every scaffold neuron left zero
    assert (net.layers[0].bias.detach()[6:].abs() > 0).all()


def test_all_zero_scaffolds_never_train():
    """Why grow gives scaffolds outgoing weights: with scale 0 no gradient reaches them."""
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    net = IsotropicMLP.from_isomlp(grow(random_model([3, 5, 2], seed=0), 0, 2, scale=0.0))
    net(x).square().sum().backward()
    assert not net.layers[0].weight.grad[5:].any() and not net.layers[0].bias.grad[5:].any()


# --- neuroadaptation ---------------------------------------------------------------------------------------------
def test_count_scaffold_counts_grown_neurons():
    model = random_model([8, 6, 6, 3], seed=0)
    assert count_scaffold(model, 1, 1e-6) == 0
    assert count_scaffold(grow(model, 1, 4), 1, 1e-6) == 4
    _, s = direction_strengths(grow(model, 1, 4).layers[1])
    assert s.shape == (10,) and torch.all(s[:-1] >= s[1:])


def test_neuroadapt_grows_to_the_target(f64_inputs):
    model = random_model([12, 10, 10, 10, 3], psi=True, o=(0.1, 2.0), seed=2)  # every direction is used
    adapted = neuroadapt(model, threshold=1e-8, target_scaffold=3)
    assert adapted.widths == (12, 13, 13, 13, 3)
    assert [count_scaffold(adapted, i, 1e-8) for i in range(3)] == [3, 3, 3]
    assert same_function(adapted, model, f64_inputs(12), 1e-12)
    assert neuroadapt(adapted, threshold=1e-8, target_scaffold=3).widths == adapted.widths  # a fixed point


def test_neuroadapt_grows_and_shrinks_in_one_pass(f64_inputs):
    """5→12: hidden space 0 has rank 5, so 7 directions with σ = 0 → keep 3; space 1 then has rank 8 + 1 (psi)
    of 12 → 3 already; space 2 has rank 12 → grow 3."""
    model = MODELS["psi_and_o"]()
    adapted = neuroadapt(model, threshold=1e-8, target_scaffold=3)
    assert adapted.widths == (5, 8, 12, 15, 3)
    assert [count_scaffold(adapted, i, 1e-8) for i in range(3)] == [3, 3, 3]
    assert same_function(adapted, model, f64_inputs(5), 1e-12)


def test_neuroadapt_removing_zero_singular_values_is_exact(f64_inputs):
    """Wider than the input: hidden space 0 has 20 − 6 directions with singular value 0 and nonzero constants."""
    model = random_model([6, 20, 20, 20, 4], psi=True, o=(0.0, 1.0), seed=3)
    adapted = neuroadapt(model, threshold=1e-9, target_scaffold=2, hidden_index=0)
    assert adapted.widths[1] == 8
    assert count_scaffold(adapted, 0, 1e-9) == 2
    assert float(adapted.layers[0].o) > float(model.layers[0].o)  # the removed constants went into o
    assert same_function(adapted, model, f64_inputs(6), 1e-12)


def test_neuroadapt_removes_weak_directions_with_small_error(f64_inputs):
    model = random_model([5, 12, 12, 12, 3], o=0.5, seed=4)
    u, s, vh = torch.linalg.svd(model.layers[1].weight)
    s[-3:] = torch.tensor([1e-7, 2e-7, 3e-7], dtype=F64)
    model = model.with_layers({1: model.layers[1].__class__(
        weight=u @ torch.diag(s) @ vh, bias=model.layers[1].bias, n_in=12, o=model.layers[1].o)})
    adapted = neuroadapt(model, threshold=1e-6, target_scaffold=1, hidden_index=1)
    assert adapted.widths == (5, 12, 10, 12, 3)
    x = f64_inputs(5)
    with torch.no_grad():
        error = float((adapted(x) - model(x)).norm(dim=1).max())
    assert 0 < error < 1e-5


def test_remove_weakest_directions_rejects_emptying_a_space():
    model = random_model([3, 4, 2], seed=0)
    with pytest.raises(IsocompressError, match="keep ≥ 1"):
        remove_weakest_directions(model, 0, 4)
    with pytest.raises(IsocompressError, match="target_scaffold"):
        neuroadapt(model, 1e-6, -1)


# --- the command -------------------------------------------------------------------------------------------------
@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.pt"
    io.save(MODELS["psi_and_o"](), path, dtype=torch.float32)
    return path


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_grow_writes_default_file(tmp_path, model_file, monkeypatch, f64_inputs):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = model_file.read_bytes()
    result = invoke(["grow", str(model_file), "--layer", "1", "--add", "4"])
    assert result.exit_code == 0, result.output
    out = work / "net.grown.safetensors"
    assert str(out) in result.output and "5→12→16→12→3" in result.output
    grown = io.load(out)
    assert grown.widths == (5, 12, 16, 12, 3) and io.stored_dtype(out) == torch.float32
    original = io.load(model_file)
    assert same_function(grown, original, f64_inputs(5), 1e-12)
    assert model_file.read_bytes() == before


def test_cli_grow_out_option(tmp_path, model_file):
    out = tmp_path / "bigger.pt"
    result = invoke(["grow", str(model_file), "--layer", "0", "--add", "2", "--seed", "3", "--scale", "0.5",
                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert io.load(out).widths == (5, 14, 12, 12, 3)


def test_cli_grow_json_and_quiet(tmp_path, model_file):
    import json

    result = invoke(["grow", str(model_file), "--layer", "0", "--add", "3", "--out", str(tmp_path / "a.pt"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["widths_after"] == [5, 15, 12, 12, 3] and report["params_after"] > report["params_before"]
    assert report["probe"]["float64"]["max_abs"] <= 1e-12
    quiet = invoke(["grow", str(model_file), "--layer", "0", "--add", "3", "--out", str(tmp_path / "b.pt"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == "" and (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--layer", "3", "--add", "1"], "--layer 3 is not a hidden space"),
    (["--layer", "-1", "--add", "1"], "--layer -1 is not a hidden space"),
    (["--layer", "0", "--add", "0"], "--add 0: the number of neurons to add must be ≥ 1"),
    (["--layer", "0", "--add", "1", "--scale", "-1"], "--scale -1.0: must be finite and ≥ 0"),
    (["--layer", "0", "--add", "1", "--out", "x.onnx"], "use a .safetensors, .pt or .pth"),
])
def test_cli_grow_bad_options(tmp_path, model_file, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(["grow", str(model_file), *args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"isocompress: error: {result.output.split('error: ', 1)[1].strip()}"]
    assert message in result.output


def test_cli_grow_never_overwrites_its_input(model_file):
    before = model_file.read_bytes()
    result = invoke(["grow", str(model_file), "--layer", "0", "--add", "1", "--out", str(model_file)])
    assert result.exit_code == 2 and "is the input model" in result.output
    assert model_file.read_bytes() == before


def test_cli_grow_missing_file(tmp_path):
    result = invoke(["grow", str(tmp_path / "nope.pt"), "--layer", "0", "--add", "1"])
    assert result.exit_code == 2 and "no such file" in result.output
