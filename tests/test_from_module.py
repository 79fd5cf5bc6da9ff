"""`isocompress.from_module`: live modules users have (the author's IsotropicConvolution, tanh and log1p, with
stride, padding and dilation; a user's own activation with a trainable intrinsic length; eval-mode BatchNorm; the
reference IsotropicTanhMLP), the same function to ~1e-12, and a one-line refusal for what breaks the symmetry."""

import pickle

import pytest
import torch
from cnn_modules import AuthorActivation, IsotropicConvolution, RefMLP, TrainableIso
from torch import nn

import isocompress
from isocompress.core.errors import IsocompressError
from isocompress.core.measure import sample_norms
from isocompress.formats import io
from isocompress.formats.modules import from_module

F64 = torch.float64


def rel(y, y2) -> float:
    return float((sample_norms(y2 - y) / sample_norms(y).clamp_min(1e-300)).max())


def same_function(net: nn.Module, model, x: torch.Tensor, tol: float = 1e-12) -> None:
    net = net.double().eval()
    for scale in (0.1, 1.0, 10.0, 1000.0):
        with torch.no_grad():
            assert rel(net(x * scale), model(x.reshape(-1, *model.input_shape) * scale)) <= tol


def author_net(sigma: str = "tanh") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        IsotropicConvolution(1, 6, 3, padding=1, activation=sigma),
        IsotropicConvolution(6, 7, 3, stride=2, padding=2, dilation=2, activation=sigma),
        IsotropicConvolution(7, 5, (2, 3), activation=sigma),
        nn.Flatten(), nn.Linear(5 * 3 * 2, 4))


@pytest.mark.parametrize("sigma", ["tanh", "log1p"])
def test_the_authors_isotropic_convolution_loads(sigma):
    net = author_net(sigma)
    notes = []
    model = from_module(net, torch.randn(3, 1, 8, 7), notify=notes.append)
    assert model.input_shape == (1, 8, 7) and [layer.sigma for layer in model.layers[:-1]] == [sigma] * 3
    assert [float(layer.o) for layer in model.layers[:-1]] == [0.0, 0.0, 0.0]
    assert [layer.geometry.describe() for layer in model.layers] == [
        "conv 3×3 p1×1", "conv 3×3 s2×2 p2×2 d2×2", "conv 2×3", "flatten 3×2 → dense"]
    same_function(net, model, torch.randn(20, 1, 8, 7, dtype=F64))
    assert any("is the identity for |z| < 0.001" in note for note in notes)  # its ε-ball, found by probing


def test_inside_the_epsilon_ball_the_difference_is_the_stated_one():
    """The author's activation is the identity for |x| < ε = 1e-3; isocompress computes tanh(m)/m there: on inputs
    so small that every pre-activation lies inside the ball, the two differ by at most ε²/3 relative, as the note says."""
    torch.manual_seed(1)
    net = nn.Sequential(IsotropicConvolution(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    with torch.no_grad():
        net[0].conv.bias.zero_()
    model = from_module(net, torch.randn(2, 2, 5, 5))
    x = torch.randn(8, 2, 5, 5, dtype=F64) * 1e-5
    net = net.double()
    with torch.no_grad():
        z = net[0].conv(x)
        assert float(torch.linalg.vector_norm(z, dim=1).max()) < 1e-3
        diff = rel(net(x), model(x))
    assert 0 < diff <= 1e-6 / 3 + 1e-15


def test_a_users_own_activation_with_a_trainable_intrinsic_length():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.a1 = nn.Conv1d(1, 12, 5, padding=2), TrainableIso(0.25)
            self.c2, self.a2 = nn.Conv1d(12, 12, 3, stride=2, padding=1), TrainableIso(0.7)
            self.head = nn.Linear(12, 10)

        def forward(self, x):  # N × 40 signals, a global mean done in code
            h = self.a2(self.c2(self.a1(self.c1(x.unsqueeze(1)))))
            return self.head(h.mean(dim=2))

    net = Net()
    model = from_module(net, torch.randn(4, 40))
    assert model.input_shape == (1, 40)
    assert [float(layer.o) for layer in model.layers[:-1]] == pytest.approx([0.25, 0.7], rel=1e-6)
    assert model.layers[-1].geometry.pool.is_global
    same_function(net, model, torch.randn(16, 40, dtype=F64))


def test_eval_mode_batchnorm_is_folded_and_said():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), AuthorActivation(),
                        nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3), AuthorActivation(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    for bn in (net[1], net[3]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    notes = []
    model = from_module(net.train(), torch.randn(2, 1, 6, 6), notify=notes.append)  # copied and put in eval mode
    assert net.training  # the user's module is not changed
    assert sum("folded BatchNorm" in note for note in notes) == 2
    same_function(net, model, torch.randn(10, 1, 6, 6, dtype=F64))


def test_batchnorm_before_a_padded_conv_is_refused():
    net = nn.Sequential(nn.Conv1d(1, 4, 3), AuthorActivation(), nn.BatchNorm1d(4), nn.Conv1d(4, 4, 3, padding=1),
                        AuthorActivation(), nn.Flatten(), nn.Linear(4 * 8, 2))
    with pytest.raises(IsocompressError, match="a BatchNorm before a zero-padded layer .* cannot be folded"):
        from_module(net, torch.randn(2, 1, 10))


@pytest.mark.parametrize("bad, message", [
    (nn.MaxPool2d(2), "module '2' (MaxPool2d): max pooling picks per channel"),
    (nn.Conv2d(4, 4, 1, groups=2), "module '2' (Conv2d): groups = 2 > 1 breaks the channel-rotation symmetry"),
    (nn.Tanh(), "what runs between '0' and '3' (1: AuthorActivation, 2: Tanh) is not an isotropic activation: it"
                " does not map each channel vector to a multiple of itself"),
])
def test_refusals_name_the_module_and_why(bad, message):
    torch.manual_seed(3)
    layers = [nn.Conv2d(1, 4, 3), AuthorActivation(), bad, nn.Conv2d(4, 4, 1), AuthorActivation(), nn.Flatten()]
    net = nn.Sequential(*layers)
    net.append(nn.LazyLinear(2))
    net(torch.randn(1, 1, 8, 8))  # materialise the lazy head
    with pytest.raises(IsocompressError) as info:
        from_module(net, torch.randn(2, 1, 8, 8))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_elementwise_activation_alone_is_refused():
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(IsocompressError, match=r"'0' and '2' \(1: ReLU\) is not an isotropic activation"):
        from_module(net, torch.randn(3, 5))


def test_a_skip_connection_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 4), AuthorActivation()

        def forward(self, x):
            return self.b(self.act(self.a(x)) + x)

    with pytest.raises(IsocompressError, match="depends on more than the output of 'a'"):
        from_module(Residual(), torch.randn(3, 4))


def test_the_reference_mlp_with_a_negative_raw_intrinsic_length():
    """Its activation keeps the flag as `positive`; trained with positive_intrinsic_length=False, o = −0.08 is stored
    raw. Running the module measures o, so the file computes the module's function (reading the state_dict with the
    default log mode would give a different one)."""
    net = RefMLP([6, 9, 8, 3], o=-0.08, positive=False)
    model = from_module(net, torch.randn(2, 6))
    assert [float(layer.o) for layer in model.layers[:-1]] == pytest.approx([-0.08, -0.08], rel=1e-6)
    x = torch.randn(30, 6, dtype=F64)
    same_function(net, model, x)
    misread = io.model_from_tensors({k: v.double() for k, v in net.state_dict().items()}, None, "state_dict",
                                    ref_intrinsic_length="log", notify=lambda _: None)
    with torch.no_grad():
        assert rel(net.double()(x), misread(x)) > 1e-3


def test_isocompress_modules_and_the_top_level_name():
    model = isocompress.random_model([4, 5, 3], psi=True, o=0.2)
    assert isocompress.from_module is from_module
    assert from_module(model, torch.randn(2, 4)).config == model.config
    from isocompress.train.nn import IsotropicMLP

    trainable = IsotropicMLP.from_isomlp(model)
    same_function(trainable, from_module(trainable, torch.randn(2, 4)), torch.randn(9, 4, dtype=F64))


def test_the_three_lines_then_the_cli(tmp_path):
    net = author_net()
    model = isocompress.from_module(net, torch.randn(2, 1, 8, 7))
    isocompress.save(model, tmp_path / "cnn.safetensors")
    loaded = isocompress.load(tmp_path / "cnn.safetensors")
    same_function(net, loaded, torch.randn(5, 1, 8, 7, dtype=F64), tol=1e-6)  # saved in float32


def test_convert_runs_a_pickled_cnn(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from isocompress.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, "cnn_modules", __import__("cnn_modules"))
    net = author_net()
    cache = tmp_path / "cache.pkl"
    with open(cache, "wb") as f:
        pickle.dump({"model": net}, f)
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(cache), "--trust-pickle", "--out", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 2 and "give --input-shape C,L or C,H,W" in result.output
    result = runner.invoke(main, ["convert", str(cache), "--trust-pickle", "--out", str(tmp_path / "c.safetensors"),
                                  "--input-shape", "1,8,7"])
    assert result.exit_code == 0, result.output
    assert "input 1×8×7" in result.output and "note: the activation after" in result.output
    same_function(net, io.load(tmp_path / "c.safetensors"), torch.randn(4, 1, 8, 7, dtype=F64), tol=1e-6)
