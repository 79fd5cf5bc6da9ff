"""The streamed exact shrink (issue 12) computes what the in-memory one does, one layer at a time."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api import shrink as api
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.exact import stream
from isocompress.exact.shrink import shrink_exact
from isocompress.formats import io

F64 = torch.float64


def _streamed(tmp_path, model, suffix=".safetensors", dtype=F64, name="m"):
    path = tmp_path / f"{name}{suffix}"
    io.save(model, path, dtype=dtype)
    report = api.shrink_file(path, tmp_path / f"{name}.out", api.ShrinkOptions(formats=("safetensors",)),
                             progress=False)
    return path, report, io.load(tmp_path / f"{name}.out" / "model.safetensors")


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=2, max_size=6), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([".safetensors", ".pt"]), st.integers(0, 1000))
def test_streamed_equals_in_memory(tmp_path_factory, widths, psi, o, suffix, seed):
    tmp_path = tmp_path_factory.mktemp("s")
    model = random_model(widths, psi=psi, o=o, seed=seed)
    path, report, got = _streamed(tmp_path, model, suffix)
    assert report["streamed"] is True
    expected = shrink_exact(io.load(path))
    assert got.widths == expected.widths and [l.kind for l in got.layers] == [l.kind for l in expected.layers]
    for a, b in zip(expected.layers, got.layers):
        for name in ("weight", "bias", "psi", "o"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-13)
    x = torch.randn(64, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        y, y2 = model(x), got(x)
    assert float((y2 - y).norm(dim=-1).max()) <= 1e-10 * max(1.0, float(y.norm(dim=-1).max()))
    assert report["probe"]["float64"]["max_rel"] < 1e-10


def test_streamed_report_matches_the_in_memory_report(tmp_path):
    model = random_model([5, 12, 12, 12, 3], psi=True, o=(0.0, 1.0), seed=2)
    path, report, _ = _streamed(tmp_path, model, ".pt", torch.float32)
    in_memory = api.shrink_file(path, tmp_path / "mem", api.ShrinkOptions(formats=("safetensors",)),
                                progress=False, stream=False)
    assert report["streamed"] is True and "in_memory_because" not in report
    assert in_memory["streamed"] is False and in_memory["in_memory_because"] == "stream=False"
    for key in ("params_before", "params_after", "widths_before", "widths_after", "layers_before", "layers",
                "dtype_saved", "bytes_before", "exact"):
        assert report[key] == in_memory[key], key
    assert report["probe"]["saved_file"]["max_rel"] < 1e-5  # a float32 file
    assert report["bytes_after"]["safetensors"] == (tmp_path / "mem" / "model.safetensors").stat().st_size


def _layout_file(tmp_path, model, layout: str, dtype):
    """The model written in one of the layouts io reads."""
    from safetensors.torch import save_file

    kind, suffix = layout.split(".")
    path = tmp_path / f"{kind}.{suffix}"
    if kind == "own":
        io.save(model, path, dtype=dtype)
        return path
    if kind == "bare":
        tensors = io.model_tensors(model, dtype)
    elif kind == "ref":
        tensors = io.reference_state_dict(model, dtype)
    else:  # "reflog": the reference default, activation.N.intrinsic_length = log o
        tensors = io.reference_state_dict(model, dtype)
        for i, layer in enumerate(model.layers[:-1]):
            del tensors[f"activation.{i}.o_const"]
            tensors[f"activation.{i}.intrinsic_length"] = torch.log(layer.o).reshape(1).to(dtype)
    if suffix == "pt":
        torch.save({"model_state_dict": tensors} if kind == "reflog" else tensors, path)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["own.pt", "own.safetensors", "ref.pt", "ref.safetensors", "reflog.pt",
                                    "bare.pt", "bare.safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_every_layout_streams_with_the_default_outputs_and_matches_the_in_memory_run(tmp_path, layout, dtype):
    """The default command (safetensors and ONNX) streams every layout, and writes what the in-memory run writes."""
    from safetensors.torch import load_file

    model = random_model([4, 16, 16, 16, 3], psi=True, o=(0.2, 1.0), seed=7)
    path = _layout_file(tmp_path, model, layout, dtype)
    assert stream.open_source(path) is not None
    streamed = api.shrink_file(path, tmp_path / "s", progress=False)
    in_memory = api.shrink_file(path, tmp_path / "m", progress=False, stream=False)
    assert streamed["streamed"] is True and in_memory["streamed"] is False
    for key in ("params_before", "params_after", "widths_before", "widths_after", "layers_before", "layers",
                "dtype_saved", "bytes_before", "bytes_after", "flops_before", "flops_after", "input_shape", "notes"):
        assert streamed.get(key) == in_memory.get(key), key
    assert list(streamed["files"]) == list(in_memory["files"]) == ["safetensors", "onnx"]
    assert streamed["constant_directions"]["dropped"] == in_memory["constant_directions"]["dropped"]
    a, b = load_file(str(tmp_path / "s" / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    assert (tmp_path / "s" / "model.onnx").read_bytes() == (tmp_path / "m" / "model.onnx").read_bytes()
    assert streamed["onnx"] == {**in_memory["onnx"], "file": streamed["onnx"]["file"]}
    # the rule's pass runs the original in reduced coordinates (docs/bounds.md §6): the same numbers up to rounding
    sc, mc = streamed["constant_directions"], in_memory["constant_directions"]
    assert sc["dropped"] == mc["dropped"] and sc["rule"] == mc["rule"] and sc["input_radius"] == mc["input_radius"]
    for key in ("output_scale", "bound"):
        assert sc[key] == pytest.approx(mc[key], rel=1e-12, abs=1e-300), key
    for kind in ("float64", "saved_file"):
        for key, value in in_memory["probe"][kind].items():
            assert streamed["probe"][kind][key] == pytest.approx(value, rel=1e-6, abs=1e-14), (kind, key)
    import numpy as np
    import onnxruntime as ort

    x = torch.randn(7, 4, dtype=F64).numpy().astype(np.float64 if dtype == F64 else np.float32)
    outs = []
    for d in "sm":
        session = ort.InferenceSession(str(tmp_path / d / "model.onnx"))
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_a_cnn_uses_the_in_memory_path(tmp_path):
    from isocompress.core.model import random_cnn

    cnn = random_cnn((1, 12), [{"channels": 3, "kernel": 3}, {"channels": 2, "flatten": True}], seed=0)
    io.save(cnn, tmp_path / "cnn.safetensors")
    assert stream.open_source(tmp_path / "cnn.safetensors") is None
    report = api.shrink_file(tmp_path / "cnn.safetensors", tmp_path / "o", progress=False)
    assert report["streamed"] is False and "a CNN" in report["in_memory_because"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_incremental_writer_round_trips(tmp_path, dtype):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 4, dtype=F64), "b": torch.randn(5, dtype=F64), "c": torch.tensor(2.5, dtype=F64)}
    writer = stream.TensorWriter(tmp_path / "t.safetensors", [(k, dtype, tuple(v.shape)) for k, v in tensors.items()],
                                 {"note": "x"})
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    back = load_file(str(tmp_path / "t.safetensors"))
    for k, v in tensors.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v.to(dtype)), k
    with pytest.raises(AssertionError):
        out_of_order = stream.TensorWriter(tmp_path / "u.safetensors", [("a", dtype, (1,)), ("b", dtype, (1,))], {})
        out_of_order.write("b", torch.zeros(1))


def test_a_file_that_disagrees_with_its_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = random_model([4, 6, 3], seed=0)
    tensors = io.model_tensors(model)
    tensors["layers.1.bias"] = torch.zeros(5, dtype=F64)  # the config says 3 outputs
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={io.CONFIG_KEY: model.config.to_json()})
    with pytest.raises(IsocompressError, match="bad.safetensors"):
        api.shrink_file(tmp_path / "bad.safetensors", tmp_path / "o", api.ShrinkOptions(formats=("safetensors",)),
                        progress=False)
    assert not (tmp_path / "o").exists()


def test_a_non_float_tensor_is_refused_in_one_line(tmp_path):
    """Found by the fuzz test: an int8 bias in a safetensors file must give the loader's message, not a KeyError."""
    from safetensors.torch import save_file

    model = random_model([3, 5, 2], seed=0)
    tensors = io.model_tensors(model, torch.float32)
    tensors["layers.0.bias"] = torch.zeros(5, dtype=torch.int8)
    save_file(tensors, str(tmp_path / "int8.safetensors"), metadata={io.CONFIG_KEY: model.config.to_json()})
    with pytest.raises(IsocompressError, match=r"int8\.safetensors: tensor 'layers\.0\.bias' has dtype torch\.int8"):
        api.shrink_file(tmp_path / "int8.safetensors", tmp_path / "o", api.ShrinkOptions(formats=("safetensors",)),
                        progress=False)


def test_labels_are_checked_on_the_streamable_path_too(tmp_path):
    # an exact safetensors-only run of our own format would stream; with labels it loads in memory, where a wrong
    # label count is an input error (never silently dropped)
    import numpy as np

    path = tmp_path / "m.safetensors"
    io.save(random_model([4, 6, 3], seed=1), path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(10, 4)))
    np.save(tmp_path / "y.npy", np.zeros(7, dtype=np.int64))
    with pytest.raises(IsocompressError, match="7 labels"):
        api.shrink_file(path, tmp_path / "out", api.ShrinkOptions(formats=("safetensors",)), progress=False,
                        calibration=tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["probes are the rule inputs", "probes are the last rows", "probes are elsewhere"])
def test_the_rule_pass_gives_the_originals_outputs_on_the_probes(tmp_path, case):
    """The streamed shrink takes the original's probe outputs from the rule's forward (no second forward of the
    original): they must be the original's outputs on exactly the probe rows, and the output scale must be that of
    the rule's inputs alone."""
    model = random_model([4, 9, 7, 3], psi=True, o=(0.0, 1.0), seed=3)
    path = tmp_path / "m.safetensors"
    io.save(model, path, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    probes = torch.randn(20, 4, dtype=F64, generator=gen)
    rule_inputs = {"probes are the rule inputs": probes.clone(),
                   "probes are the last rows": torch.cat([torch.randn(9, 4, dtype=F64, generator=gen), probes]),
                   "probes are elsewhere": 5 * torch.randn(11, 4, dtype=F64, generator=gen)}[case]
    rule = stream.constant_rule(stream.open_source(path), rule_inputs, probes)
    with torch.no_grad():
        torch.testing.assert_close(rule.y_probes, model(probes), rtol=1e-13, atol=1e-13)
        assert rule.scale == pytest.approx(float(model(rule_inputs).norm(dim=-1).max()), rel=1e-13)


def test_the_rule_pass_uses_the_same_lipschitz_chain_as_the_in_memory_path(tmp_path):
    """The streamed pass reads one layer at a time; the chain must still be the in-memory one (constants.reachable_norms)."""
    from isocompress.exact.constants import lipschitz_after, reachable_norms

    model = random_model([6, 11, 8, 8, 2], psi=True, o=(0.0, 1.5), seed=4)
    path = tmp_path / "m.safetensors"
    io.save(model, path, dtype=F64)
    x = torch.randn(5, 6, dtype=F64)
    rule = stream.constant_rule(stream.open_source(path), x)
    layers = io.load(path).layers
    expected = lipschitz_after(reachable_norms(layers), [None if l.o is None else float(l.o) for l in layers])
    assert rule.after == pytest.approx(expected, rel=1e-14)  # the same sums, up to the order of float64 rounding


@pytest.mark.parametrize("streamed", [True, False])
def test_an_onnx_file_over_the_limit_uses_external_data_and_is_verified(tmp_path, monkeypatch, streamed):
    """Over 2 GB a protobuf cannot hold the model: its tensors go to model.onnx.data. The limit is lowered here so
    that a small model takes that branch; the published pair loads in onnxruntime and gives the model's outputs."""
    import numpy as np
    import onnxruntime as ort

    from isocompress.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 2000)
    model = random_model([40, 40, 40, 4], psi=True, o=(0.0, 1.0), seed=3)
    path = _layout_file(tmp_path, model, "ref.pt", torch.float32)
    report = api.shrink_file(path, tmp_path / "out", progress=False, stream=streamed)
    assert report.get("streamed", False) is streamed
    onnx_file, data = tmp_path / "out" / "model.onnx", tmp_path / "out" / "model.onnx.data"
    assert report["onnx"]["external_data"] == "model.onnx.data" and data.exists()
    assert report["onnx"]["external_data_bytes"] == data.stat().st_size > onnx_file.stat().st_size
    assert report["onnx"]["max_rel_diff"] < 1e-4
    assert "model.onnx.data" in report["sha256"]
    session = ort.InferenceSession(str(onnx_file))
    x = torch.randn(9, 40, dtype=F64)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "out").glob(".*"))  # no temporaries left


def test_small_onnx_files_stay_self_contained(tmp_path):
    model = random_model([4, 10, 3], seed=0)
    io.save(model, tmp_path / "m.safetensors")
    report = api.shrink_file(tmp_path / "m.safetensors", tmp_path / "out", progress=False)
    assert "external_data" not in report["onnx"] and not (tmp_path / "out" / "model.onnx.data").exists()


def test_a_lossy_run_says_in_its_report_why_it_holds_the_whole_model(tmp_path):
    model = random_model([5, 12, 12, 3], psi=True, o=(0.0, 1.0), seed=3)
    path = tmp_path / "m.pt"
    io.save(model, path)
    report = api.shrink_file(path, tmp_path / "out", api.ShrinkOptions(budget=0.5, formats=("safetensors",)),
                             progress=False)
    assert report["streamed"] is False
    assert report["in_memory_because"].startswith("a lossy goal") and "original network" in report["in_memory_because"]
