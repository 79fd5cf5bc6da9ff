"""Issue 13 soak: 20 concurrent shrinks into 4 shared output directories, some failing on purpose (late, in the ONNX
check; early, on a dtype overflow). Afterwards every directory holds one complete, self-consistent set: report.json's
sha256 match its files, and the model it describes is the one in model.safetensors. No run crashes.

The runs are forked from this process (imports already loaded, so the soak costs the work, not 20 interpreter
starts); each child is a separate process with its own file descriptors, so the flock-based publish is exercised
exactly as between separate commands.
"""

import dataclasses

import pytest
import torch
from forked import finish, start

from isocompress.core.model import random_model
from isocompress.formats import io, publish

RUNS, DIRS = 20, 4


@pytest.mark.slow
def test_twenty_concurrent_shrinks_into_four_directories(tmp_path):
    models = {}
    for name, widths in (("a", [4, 6, 5, 3]), ("b", [4, 8, 3])):
        models[name] = tmp_path / f"{name}.safetensors"
        io.save(random_model(widths, psi=True, o=(0.1, 0.5), seed=len(widths)), models[name], dtype=torch.float32)
    big = random_model([4, 6, 3], seed=9)
    big = big.with_layers({0: dataclasses.replace(big.layers[0], weight=big.layers[0].weight * 1e6)})
    models["big"] = tmp_path / "big.safetensors"
    io.save(big, models["big"], dtype=torch.float32)

    plan = []
    for i in range(RUNS):
        out = tmp_path / f"out{i % DIRS}"
        if i % 5 == 0:
            args, expected = [str(models["a"]), "--onnx-tol", "1e-300"], 1  # fails late, after staging files
        elif i % 5 == 1:
            args, expected = [str(models["big"]), "--dtype", "float16"], 2  # fails early
        else:
            model = models["a" if i % 2 else "b"]
            args, expected = [str(model)] + (["--format", "safetensors"] if i % 3 == 0 else []), 0
        plan.append((["shrink", *args, "--out", str(out), "--quiet"], expected))

    children = [start(args) for args, _ in plan]
    results = [finish(*child) for child in children]

    for (args, expected), (code, text) in zip(plan, results):
        assert "Traceback" not in text, text
        assert code == expected, (args, code, text)
        if expected:
            assert len(text.strip().splitlines()) == 1 and text.startswith("isocompress: error: "), text

    for k in range(DIRS):
        out = tmp_path / f"out{k}"
        report = publish.verify(out)  # every listed file is there and is the one the report describes
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(["report.json", *report["sha256"]]), names
        model = io.load(out / "model.safetensors")
        assert list(model.widths) == report["widths_after"]
        assert report["model"] in (str(models["a"]), str(models["b"]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(publish.STAGE_PREFIX)] == []
