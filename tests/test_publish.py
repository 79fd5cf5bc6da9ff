"""Issue 13: outputs are all-or-nothing. A run stages its outputs privately and publishes them together; a failed,
interrupted or killed run leaves the previous set untouched; concurrent runs each publish a complete set; OS errors
are one line naming the path."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import cli, one_error_line
from forked import finish, forked_cli, start

from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io, publish

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path) -> Path:
    path = tmp_path / "small.safetensors"
    io.save(random_model([4, 6, 5, 3], psi=True, o=(0.1, 0.5), seed=4), path, dtype=torch.float32)
    return path


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def stages_in(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(publish.STAGE_PREFIX)]


def run_cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isocompress.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=kwargs.pop("cwd", ROOT), **kwargs)


def test_a_published_set_verifies_and_report_hashes_every_file(tmp_path, small):
    out = tmp_path / "out"
    result = cli(["shrink", small, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    report = publish.verify(out)
    assert sorted(report["sha256"]) == ["model.onnx", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "report.json"]
    assert report["files"]["safetensors"] == str(out / "model.safetensors")
    assert stages_in(tmp_path) == [] and stages_in(out) == []
    (out / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IsocompressError, match="does not match report.json"):
        publish.verify(out)


def test_a_late_failure_leaves_the_previous_set_untouched(tmp_path, small):
    # issue 13, item 1: the new model.onnx must not end up beside the old model.safetensors and report.json
    out = tmp_path / "out"
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    before = snapshot(out)
    result = cli(["shrink", small, "--budget", "0.5", "--onnx-tol", "1e-300", "--out", out, "--quiet"])
    assert result.exit_code == 1
    assert "onnxruntime output differs" in one_error_line(result)
    assert snapshot(out) == before and stages_in(out) == [] and stages_in(tmp_path) == []


def test_float16_overflow_run_into_an_existing_set_changes_nothing(tmp_path, small):
    # the reproduction of item 1: weights beyond the float16 range, --budget 0.1 --dtype float16 into D
    out = tmp_path / "out"
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    before = snapshot(out)
    big = random_model([4, 6, 5, 3], psi=True, o=(0.1, 0.5), seed=5)
    import dataclasses

    big = big.with_layers({1: dataclasses.replace(big.layers[1], weight=big.layers[1].weight * 1e6)})
    io.save(big, tmp_path / "big.safetensors", dtype=torch.float32)
    result = cli(["shrink", tmp_path / "big.safetensors", "--budget", "0.1", "--dtype", "float16", "--out", out])
    assert result.exit_code == 2
    assert "beyond the float16 range" in one_error_line(result)
    assert snapshot(out) == before


def test_a_new_set_replaces_only_files_this_tool_wrote(tmp_path, small):
    out = tmp_path / "out"
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = cli(["shrink", small, "--out", out, "--quiet", "--format", "safetensors"])
    assert result.exit_code == 0
    # the previous model.onnx (listed with its hash in the previous report) is gone: no stale file beside the set
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt", "report.json"]
    publish.verify(out)
    # a file named like an output but changed by the user (hash mismatch) is not removed
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    (out / "model.onnx").write_bytes(b"edited by hand")
    assert cli(["shrink", small, "--out", out, "--quiet", "--format", "safetensors"]).exit_code == 0
    assert (out / "model.onnx").read_bytes() == b"edited by hand"


def test_a_failed_run_into_a_new_directory_creates_nothing(tmp_path, small):
    out = tmp_path / "a" / "b" / "out"
    result = cli(["shrink", small, "--onnx-tol", "1e-300", "--out", out, "--quiet"])
    assert result.exit_code == 1
    assert not (tmp_path / "a").exists()


def test_a_symlink_named_like_an_output_that_is_the_input_is_refused(tmp_path, small):
    # item 9: MODEL = D/model.safetensors, a symlink to the real file; --out D must not replace it
    d = tmp_path / "d"
    d.mkdir()
    link = d / "model.safetensors"
    link.symlink_to(small)
    before = small.read_bytes()
    result = cli(["shrink", link, "--out", d, "--quiet"])
    assert result.exit_code == 2
    assert "would overwrite the input" in one_error_line(result)
    assert link.is_symlink() and small.read_bytes() == before
    other = tmp_path / "e"
    other.mkdir()
    (other / "model.onnx").symlink_to(small)  # a link in --out that points at the input
    result = cli(["shrink", small, "--out", other, "--quiet"])
    assert result.exit_code == 2 and "links to an input" in one_error_line(result)
    assert small.read_bytes() == before


def test_a_missing_path_with_a_newline_is_one_line(tmp_path):
    result = cli(["shrink", tmp_path / "a\nb.pt"])
    assert result.exit_code == 2
    assert "a\\nb.pt: no such file" in one_error_line(result)


# --- OS errors -----------------------------------------------------------------------------------------------------
def test_a_path_component_over_255_bytes(tmp_path, small):
    result = cli(["shrink", small, "--out", tmp_path / ("x" * 300), "--quiet"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "File name too long" in line and "shorten it" in line


def test_a_file_size_limit_while_writing(tmp_path):
    small = tmp_path / "wider.safetensors"
    io.save(random_model([32, 64, 64, 8], seed=2), small, dtype=torch.float32)
    out = tmp_path / "out"
    limit = 2048  # bytes: below the ONNX file (~8 kB with the lean graph)

    def setup():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, err = forked_cli(["shrink", small, "--out", out, "--quiet", "--format", "onnx"], setup)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "ulimit -f" in lines[0], err
    assert str(out) in lines[0]
    assert not out.exists() and stages_in(tmp_path) == []


def test_a_full_disk_while_writing(tmp_path, small, monkeypatch):
    out = tmp_path / "out"
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from isocompress.exact import stream

    monkeypatch.setattr(io, "save_safetensors", full)  # the in-memory path's writer
    monkeypatch.setattr(stream.TensorWriter, "write", full)  # the streamed path's (this file streams)
    result = cli(["shrink", small, "--out", out, "--quiet"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{out}: No space left on device; the disk is full" in line
    assert snapshot(out) == before and stages_in(out) == []


def _as_nobody(args) -> tuple[int, str]:
    """Runs the CLI in a forked child that has dropped root (uid/gid 65534); returns (exit code, stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)  # pytest's capture is not fd 2
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            from isocompress.cli import main

            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 3
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as handle:
        err = handle.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges in a child")
def test_out_in_a_read_only_directory_as_a_non_root_user():
    if os.geteuid() != 0:
        pytest.skip("not root: cannot create a user to test as (the check runs as root in CI by dropping to nobody)")
    base = Path(tempfile.mkdtemp(prefix="isocompress-perm-"))
    try:
        os.chmod(base, 0o755)
        model = base / "small.safetensors"
        io.save(random_model([3, 4, 2], seed=1), model, dtype=torch.float32)
        os.chmod(model, 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o755)  # owned by root: nobody may not write here
        code, err = _as_nobody(["shrink", model, "--out", locked / "out", "--quiet"])
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and "Permission denied" in lines[0] and "permissions" in lines[0], err
        assert "Traceback" not in err
        assert sorted(os.listdir(locked)) == []
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# --- signals -------------------------------------------------------------------------------------------------------
def signal_after_staging(sig: int):
    """A child setup: the signal arrives once the stage holds every file, before publishing."""
    def setup():
        from isocompress.api import shrink as api

        real = api.write_report

        def interrupted(report, stage):
            real(report, stage)
            os.kill(os.getpid(), sig)

        api.write_report = interrupted
        if sig == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return setup


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_while_staging_publishes_nothing_and_cleans_up(tmp_path, small, sig):
    out = tmp_path / "out"
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    before = snapshot(out)
    number = getattr(signal, sig)
    code, err = forked_cli(["shrink", small, "--format", "safetensors", "--out", out, "--quiet"],
                           signal_after_staging(number))
    assert code == 128 + number, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nothing was published" in lines[0], err
    assert snapshot(out) == before and stages_in(out) == []


def test_sigkill_leaves_only_a_hidden_stage_that_the_next_run_removes(tmp_path, small):
    out = tmp_path / "new"
    code, _ = forked_cli(["shrink", small, "--out", out, "--quiet"], signal_after_staging(signal.SIGKILL))
    assert code == -signal.SIGKILL
    assert not out.exists()  # --out is created only when a complete set is published
    left = stages_in(tmp_path)
    assert len(left) == 1 and left[0].startswith(".")
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    assert stages_in(tmp_path) == []
    publish.verify(out)


# --- concurrency ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_runs_into_one_out_each_end_complete_or_with_a_clear_error(tmp_path, small):
    # item 2: a failing run must not remove the directory while another writes; the other must not crash
    out = tmp_path / "out"
    runs = [[], ["--onnx-tol", "1e-300"], ["--format", "safetensors"], ["--onnx-tol", "1e-300"]]
    children = [start(["shrink", small, "--out", out, "--quiet", *flags]) for flags in runs]
    results = [finish(*child) for child in children]
    for (code, err), flags in zip(results, runs):
        assert "Traceback" not in err, err
        expected = 1 if "1e-300" in flags else 0
        assert code == expected, err
    report = publish.verify(out)
    assert report["model"] == str(small)
    assert stages_in(out) == [] and stages_in(tmp_path) == []
    io.load(out / "model.safetensors")


def test_a_reader_holding_the_read_lock_sees_no_publish(tmp_path, small):
    out = tmp_path / "out"
    assert cli(["shrink", small, "--out", out, "--quiet"]).exit_code == 0
    with publish.read_lock(out):
        proc = subprocess.Popen([sys.executable, "-m", "isocompress.cli", "shrink", str(small), "--out", str(out),
                                 "--quiet", "--format", "safetensors"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=8)
            finished_under_lock = True
        except subprocess.TimeoutExpired:
            finished_under_lock = False
        publish.verify(out)  # unchanged while we hold the lock
        assert sorted(json.loads((out / "report.json").read_text())["sha256"]) == ["model.onnx", "model.safetensors"]
    assert not finished_under_lock, "a publish ran while a reader held the lock"
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert sorted(publish.verify(out)["sha256"]) == ["model.safetensors"]


# --- telemetry -----------------------------------------------------------------------------------------------------
def test_nothing_is_written_under_home(tmp_path, small):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CACHE_HOME", None)
    env.pop("ORT_DISABLE_TELEMETRY", None)
    result = run_cli(["shrink", small, "--out", tmp_path / "out", "--quiet"], env=env)
    assert result.returncode == 0, result.stderr
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
    assert result.stderr == ""  # no warnings either


def test_onnxruntime_would_write_there_without_the_setting(tmp_path):
    # the test above can fail: onnxruntime does write under ~/.cache when imported without the setting
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CACHE_HOME", None)
    env.pop("ORT_DISABLE_TELEMETRY", None)
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True)
    written = [p.name for p in home.rglob("*") if p.is_file()]
    if not written:
        pytest.skip("this onnxruntime build writes nothing under HOME")
    assert "onnxruntime.db" in written or "deviceid" in written


def sigterm_during_publish():
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith("model.onnx") and publish.STAGE_PREFIX not in str(dst):  # published, report.json not yet
            os.kill(os.getpid(), signal.SIGTERM)

    publish.os.replace = replace


def test_sigterm_during_the_publish_is_deferred_until_the_set_is_complete(tmp_path, small):
    out = tmp_path / "out"
    code, err = forked_cli(["shrink", small, "--out", out, "--quiet"], sigterm_during_publish)
    assert code == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "they are complete" in lines[0], err
    assert sorted(publish.verify(out)["sha256"]) == ["model.onnx", "model.safetensors"]
