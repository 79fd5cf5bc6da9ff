"""isocompress.train.nn (issue 6): the trainable isotropic MLP equals IsoMLP's forward, saves and loads isocompress models."""

import pytest
import torch

from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.core.primitives import isotropic_tanh
from isocompress.exact.shrink import shrink_exact
from isocompress.formats import io
from isocompress.train.nn import IsotropicMLP, IsotropicTanh, inverse_softplus

F64 = torch.float64


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def randomise(net: IsotropicMLP, seed: int = 0) -> IsotropicMLP:
    """Give every parameter (psi and raw o included) a nonzero random value, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return net


@pytest.mark.parametrize("psi", [False, True])
@pytest.mark.parametrize("intrinsic_length", ["none", "fixed", "trainable"])
def test_forward_equals_isomlp(psi, intrinsic_length, f64_inputs):
    net = randomise(IsotropicMLP([5, 9, 7, 3], psi=psi, intrinsic_length=intrinsic_length, o_init=0.4, seed=1,
                                 dtype=F64))
    x = f64_inputs(5)
    with torch.no_grad():
        assert relative_error(net(x), net.to_isomlp()(x)) <= 1e-12


def test_from_isomlp_densifies_diagonal_layers_and_keeps_the_function(f64_inputs):
    shrunk = shrink_exact(random_model([6, 20, 20, 20, 4], psi=True, o=(0.1, 1.0), seed=2))
    assert "diag" in shrunk.config.kinds
    net = IsotropicMLP.from_isomlp(shrunk, dtype=F64)
    x = f64_inputs(6)
    with torch.no_grad():
        assert relative_error(net(x), shrunk(x)) <= 1e-12
    assert all(layer.weight.dim() == 2 for layer in net.layers)
    assert net.widths == shrunk.widths


def test_from_isomlp_trainable_keeps_positive_o(f64_inputs):
    model = random_model([4, 8, 8, 2], psi=True, o=(0.2, 2.0), seed=3)
    net = IsotropicMLP.from_isomlp(model, intrinsic_length="trainable", dtype=F64)
    x = f64_inputs(4)
    with torch.no_grad():
        assert relative_error(net(x), model(x)) <= 1e-12
    assert [float(layer.activation.o.detach()) for layer in net.layers[:-1]] == pytest.approx(
        [float(layer.o) for layer in model.layers[:-1]], rel=1e-12)


def test_inverse_softplus_inverts_softplus():
    o = torch.tensor([1e-6, 0.3, 2.0, 50.0, 800.0], dtype=F64)
    assert torch.allclose(torch.nn.functional.softplus(inverse_softplus(o)), o, rtol=1e-12, atol=0)
    assert float(torch.nn.functional.softplus(inverse_softplus(torch.zeros((), dtype=F64)))) < 1e-16


def test_psi_true_adds_zero_psi_without_changing_the_function(f64_inputs):
    model = random_model([4, 8, 8, 2], o=0.5, seed=4)
    net = IsotropicMLP.from_isomlp(model, psi=True, dtype=F64)
    assert all(layer.psi is not None for layer in net.layers[1:]) and net.layers[0].psi is None
    x = f64_inputs(4)
    with torch.no_grad():
        assert relative_error(net(x), model(x)) <= 1e-12


def test_trainable_o_stays_positive_under_pressure():
    act = IsotropicTanh(0.5, trainable=True, dtype=F64)
    optimiser = torch.optim.Adam(act.parameters(), lr=0.5)
    for _ in range(100):
        loss = act.o  # pushes o down as far as it goes
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert 0 < float(act.o.detach()) < 1e-3


def test_isotropic_tanh_module_matches_primitive_and_has_finite_gradients_at_zero():
    z = torch.zeros(3, 5, dtype=F64, requires_grad=True)
    act = IsotropicTanh(0.0, dtype=F64)
    act(z).sum().backward()
    assert torch.isfinite(z.grad).all()
    w = torch.randn(7, 5, dtype=F64)
    assert torch.equal(IsotropicTanh(0.3, dtype=F64)(w), isotropic_tanh(w, torch.tensor(0.3, dtype=F64))[0])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix, f64_inputs):
    net = randomise(IsotropicMLP([5, 9, 7, 3], psi=True, intrinsic_length="trainable", seed=5, dtype=F64))
    path = net.save(tmp_path / f"net{suffix}")
    tensors, config = io.read_tensors(path)
    assert config is not None and set(tensors) == set(net.to_isomlp().state_dict())
    assert {"layers.0.o", "layers.1.psi", "layers.2.weight"} <= set(tensors)
    assert all(t.dtype == F64 for t in tensors.values())  # the module's dtype is kept
    again = IsotropicMLP.load(path, intrinsic_length="trainable", dtype=F64)
    x = f64_inputs(5)
    with torch.no_grad():
        assert relative_error(again(x), net(x)) <= 1e-12
        assert relative_error(io.load(path)(x), net(x)) <= 1e-12


def test_save_float32(tmp_path):
    net = IsotropicMLP([3, 4, 2], seed=0)
    path = net.save(tmp_path / "net.pt")
    tensors, _ = io.read_tensors(path)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert net.isocompress_state_dict().keys() == tensors.keys()


def test_bad_arguments_raise_isocompress_errors():
    with pytest.raises(IsocompressError, match="intrinsic_length 'learned'"):
        IsotropicMLP([3, 4, 2], intrinsic_length="learned")
    with pytest.raises(IsocompressError, match="widths"):
        IsotropicMLP([3])
    with pytest.raises(IsocompressError, match="a trainable o is softplus"):
        IsotropicTanh(-1.0, trainable=True)
    with pytest.raises(IsocompressError, match="'none' needs o = 0"):
        IsotropicMLP.from_isomlp(random_model([3, 4, 2], o=0.5), intrinsic_length="none")


def test_state_dict_parameters_train():
    net = IsotropicMLP([3, 6, 2], psi=True, intrinsic_length="trainable", seed=0)
    names = {name for name, _ in net.named_parameters()}
    assert {"layers.0.weight", "layers.0.bias", "layers.0.activation.raw_o", "layers.1.psi"} <= names
