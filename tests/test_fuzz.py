"""Hardening (issue 5): mutated checkpoints, safetensors headers, recipes and configs go into the loaders, the parsers
and the command line. Every failure must be an `IsocompressError` with a non-empty one-line message (never another
exception), inputs stay byte-identical, and a failed command leaves no output behind.

Deterministic (derandomize=True, no example database) and sized for CI: the example counts below add up to
FUZZ_CASES (≥ 2,000); each test asserts that its cases really ran.
"""

import json
import os
import pickle
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from isocompress.api.recipe import RECIPE_KEYS, Recipe, parse_recipe_text
from isocompress.check.run import parse_config_text
from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io

ROOT = Path(__file__).resolve().parents[1]
CASES = {"bytes": 1000, "headers": 800, "state-dicts": 800, "recipes": 500, "configs": 500, "cli": 400,
         "nesting": 400, "ranges": 300, "paths": 300}  # the last three: issue 13
FUZZ_CASES = sum(CASES.values())


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_clean(exc: BaseException) -> None:
    assert isinstance(exc, IsocompressError), f"raw {type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


def run_counted(test, calls: list, n: int) -> None:
    """Runs a @given function and checks that hypothesis really tried n cases (each appends to `calls`)."""
    test()
    assert len(calls) >= n, f"only {len(calls)} of {n} cases ran"


# --- seed files ------------------------------------------------------------------------------------------------
def reference_layout(model) -> dict:
    return io.reference_state_dict(model)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Small valid checkpoints in every layout and container isocompress reads."""
    d = tmp_path_factory.mktemp("seeds")
    model = random_model([3, 5, 4, 2], psi=True, o=(0.2, 1.0), seed=1)
    io.save(model, d / "own.pt", dtype=torch.float32)
    io.save(model, d / "own.safetensors", dtype=torch.float32)
    torch.save({"isocompress_config": model.config.to_json(), "state_dict": io.model_tensors(model, torch.float32)},
               d / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(reference_layout(model), str(d / "reference.safetensors"))
    torch.save(reference_layout(model), d / "reference.pt")
    out = {p.name: p.read_bytes() for p in d.iterdir()}
    for name in out:
        io.load(d / name)  # every seed is valid
    return out


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """Bit flips, byte overwrites, truncations, splices and zeroed runs, biased to the file's head and tail (the
    safetensors header, the pickle, the zip directory)."""
    b = bytearray(data)
    position = st.one_of(st.integers(0, len(b) - 1), st.integers(0, min(255, len(b) - 1)),
                         st.integers(max(0, len(b) - 256), len(b) - 1))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "byte", "truncate", "splice", "zeros"]))
        if not b:
            break
        i = min(draw(position), len(b) - 1)
        if kind == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            b[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del b[i:]
        elif kind == "splice":
            b[i:i + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
        else:
            b[i:i + draw(st.integers(1, 64))] = bytes(min(64, len(b) - i))
    return bytes(b)


def load_and_check(path: Path) -> None:
    before = path.read_bytes()
    try:
        model = io.load(path)
    except BaseException as exc:  # noqa: BLE001 (anything but our own error fails the test)
        assert_clean(exc)
    else:
        assert model.num_params() > 0
    assert path.read_bytes() == before


def test_mutated_checkpoints_load_or_fail_cleanly(seeds, tmp_path):
    names = sorted(seeds)

    calls = []
    @fuzz_settings(CASES["bytes"])
    @given(st.data())
    def fuzz(data):
        calls.append(1)
        name = data.draw(st.sampled_from(names))
        path = tmp_path / f"mutated{Path(name).suffix}"
        path.write_bytes(data.draw(mutations(seeds[name])))
        load_and_check(path)

    run_counted(fuzz, calls, CASES["bytes"])


# --- safetensors headers ---------------------------------------------------------------------------------------
KEYS = ["layers.0.weight", "layers.0.bias", "layers.0.o", "layers.1.weight", "layers.1.bias", "layers.1.psi",
        "layers.1.o", "layers.2.weight", "layers.2.bias", "weight_parameters.0", "bias_parameters.0",
        "weight_parameters.1", "bias_parameters.1", "psi_parameters.0", "activation.0.o_const",
        "activation.0.intrinsic_length", "state_dict", "layers.x.weight", "layers.-1.bias", "layers.99999999999.o"]
DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
          "U64", "C64", "F4", "", "f32"]
CONFIGS = [
    '{"widths": [3, 5, 4, 2], "kinds": ["dense", "dense", "dense"], "has_psi": [false, true, true]}',
    '{"widths": [3, 5, 4, 2], "kinds": ["dense", "diag", "dense"], "has_psi": [false, false, true]}',
    '{"widths": [3, 2], "kinds": ["diag"], "has_psi": [true]}', '{"widths": [], "kinds": [], "has_psi": []}',
    '{"widths": [3, 1e400, 2], "kinds": ["dense", "dense"], "has_psi": [false, false]}',
    '{"widths": [true, 4, 2], "kinds": ["dense", "dense"], "has_psi": [false, false]}',
    '{"widths": [3, 4, 2], "kinds": ["dense", "dense"], "has_psi": [false, false], "version": 99}',
    '{"widths": "34", "kinds": 1, "has_psi": null}', "[]", "{", "null", '"text"',
]


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
HEADER_FLAWS = [None, None, None, None, "dtype", "shape", "offsets", "length", "short-body", "long-body", "entry",
                "json", "metadata"]


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors file written by hand: a well-formed header (random keys, dtypes, shapes, contiguous offsets,
    random data, a config or a broken one) with at most one flaw in the header or the data."""
    header, offset = {}, 0
    for key in draw(st.lists(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), max_size=7, unique=True)):
        dtype, shape = draw(st.sampled_from(sorted(ITEMSIZE))), draw(st.lists(st.integers(0, 6), max_size=2))
        size = ITEMSIZE[dtype] * (shape[0] if shape else 1) * (shape[1] if len(shape) > 1 else 1)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    meta = draw(st.one_of(st.none(), st.sampled_from(CONFIGS).map(lambda c: {"isocompress_config": c})))
    if meta is not None:
        header["__metadata__"] = meta
    body = draw(st.binary(min_size=offset, max_size=offset))
    flaw = draw(st.sampled_from(HEADER_FLAWS))
    entries = [k for k in header if k != "__metadata__"]
    if entries and flaw in ("dtype", "shape", "offsets", "entry"):
        entry = header[draw(st.sampled_from(entries))]
        if flaw == "dtype":
            entry["dtype"] = draw(st.sampled_from(["C64", "F4", "", "f32", "I128", 3]))
        elif flaw == "shape":
            entry["shape"] = draw(st.lists(st.integers(-3, 2**62), max_size=3))
        elif flaw == "offsets":
            entry["data_offsets"] = [draw(st.integers(-2, 2**41)) for _ in range(draw(st.integers(0, 3)))]
        else:
            header[entries[0]] = draw(st.sampled_from([1, "x", [], {}, {"dtype": "F32"}, None]))
    if flaw == "metadata":
        header["__metadata__"] = draw(st.sampled_from([1, [], {"other": "x"}, {"isocompress_config": 3}, None]))
    text = json.dumps(header).encode()
    if flaw == "json":
        text = text[: draw(st.integers(0, len(text) - 1))]
    length = len(text)
    if flaw == "length":
        length = draw(st.sampled_from([0, 1, length - 1, length + 1, 2**40, 2**64 - 1]))
    if flaw == "short-body":
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    elif flaw == "long-body":
        body += draw(st.binary(min_size=1, max_size=16))
    return struct.pack("<Q", max(length, 0)) + text + body


# --- state dicts with the wrong keys, shapes, dtypes and values --------------------------------------------------
TENSOR_FLAWS = ["drop", "add", "reshape", "dtype", "value", "rename", "config"]


@st.composite
def flawed_state_dicts(draw, layouts: dict) -> tuple[dict, dict | None]:
    """A valid layout's tensors with 1–3 flaws: a key dropped, added or renamed, a shape or dtype changed, a value
    NaN/inf/huge/negative, the config replaced. Returns (tensors, safetensors metadata or None)."""
    layout = draw(st.sampled_from(sorted(layouts)))
    tensors, config = {k: v.clone() for k, v in layouts[layout][0].items()}, layouts[layout][1]
    for _ in range(draw(st.integers(1, 3))):
        flaw, key = draw(st.sampled_from(TENSOR_FLAWS)), draw(st.sampled_from(sorted(tensors) or ["layers.0.weight"]))
        if flaw == "drop" and tensors:
            tensors.pop(key, None)
        elif flaw == "add":
            name = draw(st.sampled_from(KEYS[:16] + ["layers.3.weight", "layers.1.psi", "extra"]))
            tensors[name] = torch.randn(draw(st.lists(st.integers(0, 5), max_size=2)))
        elif flaw == "reshape" and key in tensors:
            shape = draw(st.lists(st.integers(0, 6), max_size=3))
            tensors[key] = torch.randn(shape)
        elif flaw == "dtype" and key in tensors:
            dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float16,
                                          torch.bfloat16, torch.float64, torch.float8_e4m3fn]))
            tensors[key] = tensors[key].to(dtype)
        elif flaw == "value" and key in tensors and tensors[key].numel():
            value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38, -1.0, -1e30, 0.0]))
            tensors[key] = tensors[key].float().flatten().index_fill(0, torch.tensor([0]), value).reshape(tensors[key].shape)
        elif flaw == "rename" and key in tensors:
            tensors[key.replace("0", "5").replace("1", "0")] = tensors.pop(key)
        elif flaw == "config":
            config = draw(st.sampled_from(CONFIGS))
    return tensors, None if config is None else {"isocompress_config": config}


def write_state_dict(path: Path, tensors: dict, metadata: dict | None) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save({**({"isocompress_config": metadata["isocompress_config"]} if metadata else {}),
                    "state_dict": tensors}, path)


@pytest.fixture(scope="module")
def layouts() -> dict:
    model = random_model([3, 5, 4, 2], psi=True, o=(0.2, 1.0), seed=2)
    shrunk = random_model([3, 5, 4, 2], psi=True, o=(0.2, 1.0), seed=2)
    from isocompress.exact.shrink import shrink_exact

    diag = shrink_exact(shrunk)
    return {"own": (io.model_tensors(model, torch.float32), model.config.to_json()),
            "own-diagonal": (io.model_tensors(diag, torch.float32), diag.config.to_json()),
            "reference": (reference_layout(model), None)}


def test_flawed_state_dicts(layouts, tmp_path):
    calls = []

    @fuzz_settings(CASES["state-dicts"])
    @given(flawed_state_dicts(layouts), st.sampled_from([".safetensors", ".pt"]))
    def fuzz(flawed, suffix):
        calls.append(1)
        path = tmp_path / f"flawed{suffix}"
        write_state_dict(path, *flawed)
        load_and_check(path)

    run_counted(fuzz, calls, CASES["state-dicts"])


def test_random_safetensors_headers(tmp_path):
    calls = []
    @fuzz_settings(CASES["headers"])
    @given(safetensors_files())
    def fuzz(blob):
        calls.append(1)
        path = tmp_path / "header.safetensors"
        path.write_bytes(blob)
        load_and_check(path)

    run_counted(fuzz, calls, CASES["headers"])


# --- recipes and configs ---------------------------------------------------------------------------------------
TOML_VALUES = st.one_of(
    st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: "nan" if f != f else ("inf" if f == float("inf") else ("-inf" if f == -float("inf") else repr(f)))),
    st.sampled_from(['"10%"', '"1%"', '"-5%"', '"abc%"', '"%"', '"60 kB"', '"1.5 MiB"', '"x B"', '"1e999"', "true",
                     "false", "[]", '["onnx"]', '["safetensors", "onnx", "onnx"]', "{}", '{ a = 1 }', "1979-05-27",
                     '"data-aware"', '"float16"', '"certified"', '"empirical"', '""', '"\\n"', '"../x.npy"',
                     '"models/digits.pt"', '"recipes/exact.toml"', "[1, [2]]", '"\\u0000"']),
    st.text(max_size=12).map(json.dumps),
)
CHECK_KEYS = ["model", "recipe", "calibration", "labels", "max-params", "max-bytes", "max-error", "error-measure",
              "min-accuracy", "name", "max_params", "x"]


@st.composite
def toml_tables(draw, keys: list[str]) -> str:
    lines = [f"{draw(st.sampled_from(keys))} = {draw(TOML_VALUES)}" for _ in range(draw(st.integers(0, 6)))]
    return "\n".join(lines) + "\n"


@st.composite
def mutated_text(draw, text: str) -> str:
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(chars)))
        kind = draw(st.sampled_from(["delete", "insert", "replace"]))
        if kind == "delete":
            del chars[i:i + draw(st.integers(1, 8))]
        elif kind == "insert":
            chars[i:i] = list(draw(st.sampled_from(['"', "=", "[", "]", "\n", "#", "'", "%", "-", "0", "{", " ", "é"])))
        else:
            chars[i:i + 1] = list(draw(st.text(max_size=3)))
    return "".join(chars)


SHIPPED_RECIPES = [p.read_text() for p in sorted((ROOT / "recipes").glob("*.toml"))]
SHIPPED_CONFIG = (ROOT / "isocompress.toml").read_text()


def parse_or_fail_cleanly(parse, text: str):
    try:
        return parse(text)
    except BaseException as exc:  # noqa: BLE001
        assert_clean(exc)
        return None


def test_mutated_and_random_recipes():
    texts = st.one_of(st.sampled_from(SHIPPED_RECIPES).flatmap(mutated_text),
                      toml_tables(list(RECIPE_KEYS) + ["max_error", "size", "budget.x"]))

    calls = []
    @fuzz_settings(CASES["recipes"])
    @given(texts)
    def fuzz(text):
        calls.append(1)
        recipe = parse_or_fail_cleanly(lambda t: parse_recipe_text(t, "recipes/fuzzed.toml"), text)
        if recipe is not None:
            assert Recipe.from_dict(recipe.to_dict(), path=recipe.path) == recipe
            recipe.to_options()

    run_counted(fuzz, calls, CASES["recipes"])


def test_mutated_and_random_configs():
    tables = toml_tables(CHECK_KEYS).map(lambda t: "[[check]]\n" + t)
    texts = st.one_of(st.just(SHIPPED_CONFIG).flatmap(mutated_text), tables,
                      st.lists(tables, min_size=1, max_size=3).map("\n".join),
                      tables.map(lambda t: "[tool.isocompress]\n" + t.replace("[[check]]\n", "[[tool.isocompress.check]]\n")))

    calls = []
    @fuzz_settings(CASES["configs"])
    @given(texts, st.booleans())
    def fuzz(text, pyproject):
        calls.append(1)
        parse = lambda t: parse_config_text(t, "pyproject.toml" if pyproject else "isocompress.toml", ROOT, pyproject)
        config = parse_or_fail_cleanly(parse, text)
        if config is not None:
            assert config.checks and all(spec.limits() for spec in config.checks)

    run_counted(fuzz, calls, CASES["configs"])


# --- the command line ------------------------------------------------------------------------------------------
PROGRESS_LINE = re.compile(r"check \d+/\d+: .*, \d+\.\d s")  # one plain line per model checked (issue 12)


def invoke_clean(args: list[str], inputs: list[Path], out: Path | None):
    """Runs the CLI; asserts exit 0/1/2, a one-line error, unchanged inputs, and no partial output on failure."""
    before = {p: p.read_bytes() for p in inputs}
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 2 or (result.exit_code == 1 and args[0] == "shrink"):
        lines = [l for l in result.stderr.strip().splitlines() if not PROGRESS_LINE.fullmatch(l)]  # check's progress
        assert len(lines) == 1 and lines[0].startswith("isocompress: error: ") and len(lines[0]) > 20, result.stderr
        assert out is None or not out.exists(), "partial output left behind"
    elif out is not None:
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json"]
    assert {p: p.read_bytes() for p in inputs} == before, "an input was modified"
    return result


CHECK_TEMPLATE = {"model": '"small.pt"', "recipe": '"exact.toml"', "max-params": "100000", "max-bytes": '"1 MiB"',
                  "max-error": "0.001", "error-measure": '"empirical"', "calibration": '"calib.npy"',
                  "labels": '"labels.npy"', "min-accuracy": '"50%"', "name": '"fuzz"'}


@st.composite
def check_configs(draw) -> str:
    """A valid check entry (a small model, the exact recipe, inputs, every limit) with keys dropped or their values
    replaced by random TOML values."""
    lines = []
    for key, value in CHECK_TEMPLATE.items():
        choice = draw(st.sampled_from(["keep", "keep", "keep", "drop", "random"]))
        if choice != "drop":
            lines.append(f"{key} = {value if choice == 'keep' else draw(TOML_VALUES)}")
    return "[[check]]\n" + "\n".join(lines) + "\n"


FLAG_VALUES = {
    "--budget": ["0.5", "50%", "1e9", "inf", "nan", "-1", "0", "1e400", "12.5", "abc", "%", "", "0x10", "1_000"],
    "--max-error": ["0.1", "1%", "-1", "nan", "inf", "x", "%", "1e-400", "-0%", "1e400%"],
    "--input-radius": ["1", "inf", "nan", "-1", "0", "1e-300", "1e300"],
    "--onnx-tol": ["1e-4", "0", "-1", "nan", "inf"],
    "--format": ["safetensors", "", ",", "tflite", "safetensors,safetensors"],
    "--dtype": ["float16", "float64", "bfloat16"],
    "--basis": ["data-free", "data-aware", "auto"],
    "--calibration": ["calib.npy", "labels.npy", "small.pt", "missing.npy", "exact.toml", "huge.npy", "tiny.npy"],
    "--labels": ["labels.npy", "calib.npy", "small.pt"],
    "--recipe": ["exact.toml", "missing.toml", "calib.npy", "deep.toml", "pct.toml"],
}


@st.composite
def shrink_flags(draw) -> list[str]:
    """0–3 shrink flags with values valid or not (values click accepts, so that isocompress must judge them)."""
    flags = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=3, unique=True)):
        flags += [flag, draw(st.sampled_from(FLAG_VALUES[flag]))]
    return flags


@pytest.fixture
def cli_project(seeds, tmp_path):
    (tmp_path / "small.pt").write_bytes(seeds["own.pt"])
    (tmp_path / "exact.toml").write_text('name = "exact"\nformats = ["safetensors"]\n')
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "calib.npy", x.numpy())
    np.save(tmp_path / "labels.npy", io.load(tmp_path / "small.pt")(x.double()).argmax(-1).numpy())
    np.save(tmp_path / "huge.npy", np.full((4, 3), 1e30))  # issue 13: beyond what float32 arithmetic squares
    np.save(tmp_path / "tiny.npy", np.full((4, 3), 1e-300))
    (tmp_path / "deep.toml").write_text("budget = " + "[" * 3000 + "]" * 3000 + "\n")
    (tmp_path / "pct.toml").write_text('budget = "200%"\n')
    return tmp_path


def test_cli_on_mutated_checkpoints_and_configs(seeds, layouts, cli_project):
    work = cli_project
    inputs = [work / name for name in ("small.pt", "exact.toml", "calib.npy", "labels.npy", "huge.npy", "deep.toml")]
    names = sorted(seeds)
    calls = []

    @fuzz_settings(CASES["cli"])
    @given(st.data())
    def fuzz(data):
        calls.append(1)
        kind = data.draw(st.sampled_from(["bytes", "state-dict", "config", "flags"]))
        out = Path(tempfile.mkdtemp(dir=work)) / "out"
        if kind == "config":
            config = work / "fuzzed.toml"
            config.write_text(data.draw(check_configs()))
            invoke_clean(["check", "--config", str(config), "--quiet"], [config, *inputs], None)
            return
        flags = data.draw(st.sampled_from([[], ["--dtype", "float16"], ["--dtype", "float64"], ["--exact"]]))
        if kind == "bytes":
            name = data.draw(st.sampled_from(names))
            model = work / f"mutated{Path(name).suffix}"
            model.write_bytes(data.draw(mutations(seeds[name])))
        elif kind == "state-dict":
            model = work / f"flawed{data.draw(st.sampled_from(['.safetensors', '.pt']))}"
            write_state_dict(model, *data.draw(flawed_state_dicts(layouts)))
        else:
            flags = data.draw(shrink_flags())
            model, flags = work / "small.pt", [str(work / f) if f.endswith((".npy", ".pt", ".toml")) else f for f in flags]
        args = ["shrink", str(model), "--out", str(out), "--format", "safetensors", "--quiet", *flags]
        invoke_clean(args, [model, *inputs], out)

    run_counted(fuzz, calls, CASES["cli"])


def test_the_fuzz_budget():
    assert FUZZ_CASES >= 5000


# --- issue 13: deep nesting, out-of-range values, path edge cases ----------------------------------------------------
@st.composite
def nested_text(draw, toml: bool) -> str:
    """Text nesting arrays/tables/objects 1–3000 deep (sometimes inside strings or comments, which do not count)."""
    depth = draw(st.sampled_from([1, 2, 30, 64, 65, 100, 1000, 3000]))
    open_, close = draw(st.sampled_from([("[", "]"), ("{a = " if toml else '{"a": ', "}")]))
    inner = draw(st.sampled_from(["1", "[]", '"x"', "{}", ""]))
    body = open_ * depth + inner + close * draw(st.sampled_from([depth, depth - 1, 0]))
    key = draw(st.sampled_from(["budget", "check", "x", "name", "a.b"]))
    wrap = draw(st.sampled_from(["plain", "string", "comment", "dotted"]))
    if not toml:
        return body if wrap != "string" else json.dumps(body)
    if wrap == "string":
        return f'{key} = {json.dumps(body)}\n'
    if wrap == "comment":
        return f"# {body}\nbudget = 0.5\n"
    if wrap == "dotted":
        return ".".join(["k"] * depth) + " = 1\n"
    return f"{key} = {body}\n"


def test_deeply_nested_recipes_configs_baselines_and_metadata(tmp_path):
    from isocompress.check.baseline import load_baseline
    from isocompress.core.config import ModelConfig

    calls = []

    @fuzz_settings(CASES["nesting"])
    @given(st.data())
    def fuzz(data):
        calls.append(1)
        kind = data.draw(st.sampled_from(["recipe", "config", "baseline", "metadata"]))
        if kind in ("recipe", "config"):
            text = data.draw(nested_text(True))
            parse = (lambda t: parse_recipe_text(t, "fuzzed.toml")) if kind == "recipe" else \
                (lambda t: parse_config_text(t, "fuzzed.toml", ROOT))
            parse_or_fail_cleanly(parse, text)
        elif kind == "baseline":
            path = tmp_path / "baseline.json"
            path.write_text(data.draw(nested_text(False)))
            parse_or_fail_cleanly(lambda _: load_baseline(path), "")
        else:
            parse_or_fail_cleanly(ModelConfig.from_json, data.draw(nested_text(False)))

    run_counted(fuzz, calls, CASES["nesting"])


HUGE = [1e4, 1e15, 1e19, 1e30, 1e38, 3e38, 1e100, 1e300, 1.7e308]


def test_out_of_range_models_and_calibration(tmp_path):
    """Values that may not fit the dtypes a run computes or saves in: ranges.check_run either accepts them (and then
    the float64 reference and, for float32 ONNX, a float32 forward stay finite) or refuses them cleanly."""
    from isocompress.core import ranges
    from isocompress.core.measure import probe_inputs

    base = random_model([3, 4, 2], psi=True, o=(0.1, 0.5), seed=3)
    probes = probe_inputs(3, per_scale=8)
    calls = []

    @fuzz_settings(CASES["ranges"])
    @given(st.sampled_from(["weight", "bias", "o", "calibration"]), st.sampled_from(HUGE), st.booleans(),
           st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), st.floats(0.01, 1.0))
    def fuzz(where, value, onnx, saved, factor):
        calls.append(1)
        value *= factor
        model, calib = base, None
        if where == "calibration":
            calib = torch.full((4, 3), value, dtype=torch.float64)
        else:
            i = 0 if where == "o" else 1
            layer = model.layers[i]
            name = {"weight": "weight", "bias": "bias", "o": "o"}[where]
            import dataclasses
            model = model.with_layers({i: dataclasses.replace(layer, **{name: getattr(layer, name) * 0 + value})})
        try:
            ranges.check_run(model, probes, calib, saved, onnx, "m.safetensors", "c.npy")
        except BaseException as exc:  # noqa: BLE001
            assert_clean(exc)
            return
        x = probes if calib is None else calib
        with np.errstate(all="raise"):
            y = model(x)
        assert bool(torch.isfinite(y).all())
        if onnx and saved != torch.float64 and calib is None:
            assert bool(torch.isfinite(model.cast(torch.float32)(x.float())).all())

    run_counted(fuzz, calls, CASES["ranges"])


def test_path_edge_cases(tmp_path, seeds):
    """Names with newlines and control characters, over-long components, FIFOs, directories, symlinks (dangling
    and not), into the model and array loaders: a model or one clean line, never a hang or a raw OSError."""
    from isocompress.formats.data import load_array

    (tmp_path / "ok.safetensors").write_bytes(seeds["own.safetensors"])
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    calls = []

    @fuzz_settings(CASES["paths"])
    @given(st.sampled_from(["newline", "control", "long", "fifo", "dir", "link", "dangling", "deep"]),
           st.sampled_from([".pt", ".safetensors", ".npy", ".npz"]), st.text(max_size=8))
    def fuzz(kind, suffix, stem):
        calls.append(1)
        clean = "".join(c for c in stem if c.isalnum()) or "x"
        if kind == "newline":
            path = tmp_path / f"a\n{clean}{suffix}"
        elif kind == "control":
            path = tmp_path / f"a\x1b[31m\r{clean}{suffix}"
        elif kind == "long":
            path = tmp_path / ("x" * 300 + suffix)
        elif kind == "fifo":
            path = fifo
        elif kind == "dir":
            path = tmp_path
        elif kind == "deep":
            path = tmp_path.joinpath(*(["d"] * 2000)) / f"m{suffix}"
        else:
            path = tmp_path / f"link-{kind}-{clean}{suffix}"
            if not path.is_symlink():
                path.symlink_to(tmp_path / ("ok.safetensors" if kind == "link" else "missing"))
        loader = io.load if suffix in (".pt", ".safetensors") else (lambda p: load_array(p, expect_columns=3))
        try:
            loader(path)
        except BaseException as exc:  # noqa: BLE001
            assert_clean(exc)

    run_counted(fuzz, calls, CASES["paths"])


# --- a checkpoint whose unpickling would run code --------------------------------------------------------------
class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, container):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    payload = {"state_dict": {"layers.0.weight": torch.zeros(2, 3)}, "x": RunsCode(marker)}
    if container == "zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "proof")))  # the payload really runs code when unpickled
    assert (tmp_path / "proof").exists()
    before = evil.read_bytes()
    monkeypatch.chdir(tmp_path)

    with pytest.raises(IsocompressError, match="refused|not a readable PyTorch checkpoint") as info:
        io.load(evil)
    assert_clean(info.value)
    shrink = invoke_clean(["shrink", str(evil), "--out", str(tmp_path / "out")], [evil], tmp_path / "out")
    assert shrink.exit_code == 2 and "evil.pt" in shrink.stderr
    io.save(random_model([3, 4, 2]), tmp_path / "ok.pt")
    (tmp_path / "ok.toml").write_text('[[check]]\nmodel = "ok.pt"\ncalibration = "evil.pt"\nlabels = "evil.pt"\n'
                                      'min-accuracy = 0.5\n')
    as_calibration = invoke_clean(["check", "--config", "ok.toml"], [evil], None)
    assert as_calibration.exit_code == 2 and "evil.pt" in as_calibration.stderr
    checked = invoke_clean(["check", str(evil), "--max-params", "10"], [evil], None)
    assert checked.exit_code == 2
    assert not marker.exists(), "unpickling ran code"
    assert evil.read_bytes() == before
