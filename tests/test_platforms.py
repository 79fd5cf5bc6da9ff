"""Platforms without fcntl, SIGHUP or SIGXFSZ (Windows), simulated on Linux: `shrink`, `export` and `check` run and
publish all-or-nothing there (README "Platforms"; docs/ci.md, "Outputs are all-or-nothing").

Each test runs a scenario in a fresh interpreter (SIMULATION below) in which, before isocompress is imported:

* `import fcntl` (and the other POSIX-only modules: resource, termios, pwd, grp) fails, so isocompress takes its
  non-POSIX branches (`publish.POSIX` is False). filelock is imported first and so keeps its native lock, flock here,
  in the place of LockFileEx on Windows: the lock the non-POSIX code takes is a real OS lock, released when a process
  dies;
* the signals Windows lacks (SIGHUP, SIGXFSZ and every other one but SIGINT, SIGTERM, SIGABRT, SIGFPE, SIGILL,
  SIGSEGV) and POSIX-only os functions (sched_getaffinity, getuid, fchmod, O_DIRECTORY, ...) are deleted;
* os.replace, os.rename, os.unlink and os.remove act as on Windows: a file that any process has open (an fd in
  /proc/*/fd, or a mapping in /proc/*/maps: our own process too) can be neither replaced, renamed nor removed
  (PermissionError), and os.rename onto an existing name fails.

Runs that must be separate processes (signals, kills, concurrency) are forked from the simulated interpreter
(tests/forked.py), so they inherit the simulation. What this cannot show: Windows's own behaviour beyond these rules
(LockFileEx itself, SIGBREAK, path rules, virus scanners); no Windows or macOS machine ran this suite.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli

from isocompress.core.model import random_model
from isocompress.formats import io, publish

ROOT = Path(__file__).resolve().parents[1]
RESULT = "SIMULATION-RESULT "

SIMULATION = r'''
import os, signal, sys

import filelock._native  # binds flock now: the stand-in for LockFileEx, which filelock has on Windows

HIDDEN = {"fcntl", "resource", "termios", "pwd", "grp"}
for _name in HIDDEN:
    sys.modules.pop(_name, None)


class _HidePosixModules:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (simulated Windows)", name=name)
        return None


sys.meta_path.insert(0, _HidePosixModules())
WINDOWS_SIGNALS = {"SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM"}
for _name in [n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_") and n not in WINDOWS_SIGNALS]:
    delattr(signal, _name)
for _name in ("pthread_sigmask", "pthread_kill", "alarm", "setitimer", "getitimer", "siginterrupt", "sigwait"):
    if hasattr(signal, _name):
        delattr(signal, _name)
for _name in ("sched_getaffinity", "getuid", "geteuid", "getgid", "getegid", "fchmod", "fchown", "chown",
              "O_DIRECTORY", "O_NOFOLLOW", "getloadavg", "statvfs", "posix_fadvise", "posix_fallocate", "mkfifo"):
    if hasattr(os, _name):
        delattr(os, _name)


def _opened_anywhere():
    """Every file some process has open or mapped (Windows refuses to replace or remove those)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            found.update(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if fd.isdigit())
            with open(f"/proc/{pid}/maps") as maps:
                found.update(line.split(maxsplit=5)[5].rstrip("\n") for line in maps if len(line.split()) >= 6)
        except OSError:
            continue
    return found


def _resolved(path, dir_fd):
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return path


def _in_use(path, dir_fd=None):
    path = _resolved(path, dir_fd)
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    return os.path.realpath(path) in _opened_anywhere()


def _refuse(path):
    with open(os.environ["SIMULATION_REFUSALS"], "a") as log:  # every refusal, forked runs' too: what the test sees
        log.write(os.fsdecode(os.fspath(path)) + "\n")
    raise PermissionError(13, "The process cannot access the file because it is being used by another process"
                          " (simulated Windows)", os.fspath(path))


_real_replace, _real_unlink = os.replace, os.unlink


def _replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
    for path, dir_fd in ((src, src_dir_fd), (dst, dst_dir_fd)):
        if _in_use(path, dir_fd):
            _refuse(path)
    return _real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def _rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
    if os.path.lexists(_resolved(dst, dst_dir_fd)):
        raise FileExistsError(17, "Cannot create a file when that file already exists (simulated Windows)", dst)
    return _replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def _unlink(path, *, dir_fd=None):
    if _in_use(path, dir_fd):
        _refuse(path)
    return _real_unlink(path, dir_fd=dir_fd)


os.replace, os.rename, os.unlink, os.remove = _replace, _rename, _unlink, _unlink

# --- what a scenario uses ---
import hashlib, json, time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path.cwd() / "tests"))
from forked import finish, forked_cli, start  # noqa: E402

from isocompress.formats import publish  # noqa: E402
import isocompress.api.shrink, isocompress.check.run, isocompress.cli, isocompress.export.onnx_export  # noqa: E402
import onnxruntime  # noqa: E402  (imported once here: the forked runs start with it)


def snapshot(directory):
    """{name: sha256} of what a directory holds, but for stages (a run in progress; `stages` lists them)."""
    directory = Path(directory)
    if not directory.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "(dir)"
            for p in sorted(directory.iterdir()) if not p.name.startswith(publish.STAGE_PREFIX)}


def stages(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(publish.STAGE_PREFIX))


def verified(out):
    try:
        return sorted(publish.verify(out)["sha256"])
    except Exception as exc:  # noqa: BLE001
        return f"not verified: {exc}"


def emit(result):
    print("SIMULATION-RESULT " + json.dumps(result))
'''


def simulated(scenario: str, **values) -> dict:
    """Runs `scenario` (Python; `values` are bound as its globals) in a simulated interpreter; returns what it emits,
    with "refused": the paths whose replacement or removal the simulation refused because a process had them open."""
    code = SIMULATION + "".join(f"{k} = {v!r}\n" for k, v in values.items()) + textwrap.dedent(scenario)
    with tempfile.TemporaryDirectory() as tmp:
        refusals = Path(tmp) / "refused"
        refusals.touch()
        proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "SIMULATION_REFUSALS": str(refusals)})
        refused = refusals.read_text().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return {**json.loads(lines[0][len(RESULT):]), "refused": refused}


@pytest.fixture
def models(tmp_path) -> dict[str, str]:
    paths = {}
    for name, widths, seed in (("a", [4, 6, 5, 3], 4), ("b", [4, 8, 3], 3)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        io.save(random_model(widths, psi=True, o=(0.1, 0.5), seed=seed), paths[name], dtype=torch.float32)
    return paths


def error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isocompress: error: ") and "Traceback" not in text, text
    return lines[0]


def test_the_simulation_lacks_what_windows_lacks_and_refuses_what_windows_refuses(tmp_path):
    got = simulated('''
    import importlib
    result = {}
    for name in ("fcntl", "resource"):
        try:
            importlib.import_module(name)
            result[name] = "imported"
        except ImportError:
            result[name] = "missing"
    result["signals"] = sorted(n for n in ("SIGHUP", "SIGXFSZ", "SIGTERM", "SIGINT") if hasattr(signal, n))
    result["deferred"] = sorted(signal.Signals(s).name for s in publish.DEFERRED_SIGNALS)
    from isocompress.cli import base
    with base.signals_raise():
        result["raising"] = sorted(signal.Signals(s).name for s in range(1, 65)
                                   if s in signal.valid_signals() and signal.getsignal(s) is base._raise_terminated)
    result["posix"] = publish.POSIX
    target = Path(TMP) / "held"
    target.write_text("old")
    (Path(TMP) / "new").write_text("new")
    with open(target) as held:
        try:
            os.replace(Path(TMP) / "new", target)
            result["replace_open"] = "replaced"
        except PermissionError:
            result["replace_open"] = "refused"
    os.replace(Path(TMP) / "new", target)
    result["after_close"] = target.read_text()
    from filelock import lock_descriptor
    first, second = (os.open(Path(TMP) / "lock", os.O_RDWR | os.O_CREAT) for _ in range(2))
    result["locks"] = [lock_descriptor(first, blocking=False), lock_descriptor(second, blocking=False)]
    emit(result)
    ''', TMP=str(tmp_path))
    assert got["refused"] == [str(tmp_path / "held")]
    assert got["fcntl"] == got["resource"] == "missing"
    assert got["signals"] == ["SIGINT", "SIGTERM"]
    assert got["deferred"] == ["SIGINT", "SIGTERM"] and got["raising"] == ["SIGTERM"]
    assert got["posix"] is False
    assert got["replace_open"] == "refused" and got["after_close"] == "new"
    assert got["locks"] == [True, False]  # the native lock excludes a second holder


def test_shrink_and_export_publish_complete_sets_with_the_same_files_as_on_linux(tmp_path, models):
    native = tmp_path / "native"
    assert cli(["shrink", models["a"], "--out", native, "--quiet"]).exit_code == 0
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    result["shrink"] = forked_cli(["shrink", A, "--out", out, "--quiet"])
    result["shrink_set"], result["listing"] = verified(out), sorted(os.listdir(out))
    result["snapshot"] = snapshot(out)
    (out / "notes.txt").write_text("mine")
    result["again"] = forked_cli(["shrink", A, "--out", out, "--quiet", "--format", "safetensors"])  # streamed
    result["again_set"], result["again_listing"] = verified(out), sorted(os.listdir(out))
    exported = Path(TMP) / "exported"
    result["export"] = forked_cli(["export", B, "--out", exported, "--quiet", "--format", "onnx,safetensors"])
    result["export_set"] = verified(exported)
    result["stages"] = stages(TMP) + stages(out) + stages(exported)
    result["parent"] = sorted(os.listdir(TMP))
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"], B=models["b"])
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["shrink"][0] == 0, got["shrink"]
    assert got["shrink_set"] == ["model.onnx", "model.safetensors"]
    assert got["listing"] == ["model.onnx", "model.safetensors", "report.json"]
    assert got["again"][0] == 0, got["again"]
    # the previous model.onnx (listed in the previous report) is gone; the user's file stays
    assert got["again_set"] == ["model.safetensors"]
    assert got["again_listing"] == ["model.safetensors", "notes.txt", "report.json"]
    assert got["export"][0] == 0 and got["export_set"] == ["model.onnx", "model.safetensors"], got["export"]
    assert got["stages"] == []
    # only the lock file beside --out (kept here; Windows removes it after each publish)
    assert sorted(set(got["parent"]) - {"a.safetensors", "b.safetensors", "native"}) == [
        ".isocompress-publish.lock", "exported", "out"]
    native_files = {p.name: publish.sha256(p) for p in native.iterdir() if p.name != "report.json"}
    assert got["snapshot"]["model.safetensors"] == native_files["model.safetensors"]


def test_a_failing_run_publishes_nothing_and_leaves_the_previous_set(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    assert forked_cli(["shrink", A, "--out", out, "--quiet"])[0] == 0
    before = snapshot(out)
    result["late"] = forked_cli(["shrink", A, "--budget", "0.5", "--onnx-tol", "1e-300", "--out", out, "--quiet"])
    result["late_same"] = snapshot(out) == before
    result["export"] = forked_cli(["export", A, "--onnx-tol", "1e-300", "--out", out, "--quiet"])
    result["export_same"] = snapshot(out) == before
    fresh = Path(TMP) / "a" / "b" / "fresh"
    result["fresh"] = forked_cli(["shrink", A, "--onnx-tol", "1e-300", "--out", fresh, "--quiet"])
    result["fresh_exists"] = (Path(TMP) / "a").exists()
    result["stages"] = stages(TMP) + stages(out)
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"])
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["late"][0] == 1 and "onnxruntime output differs" in error_line(got["late"][1])
    assert got["export"][0] == 1 and "onnxruntime output differs" in error_line(got["export"][1])
    assert got["late_same"] and got["export_same"]
    assert got["fresh"][0] == 1 and not got["fresh_exists"]
    assert got["stages"] == []


def test_a_file_in_use_fails_the_publish_and_restores_the_previous_set(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    assert forked_cli(["shrink", A, "--out", out, "--quiet"])[0] == 0
    before = snapshot(out)

    def quick():
        publish.REPLACE_RETRY_S = 0.5

    with open(out / "model.safetensors", "rb"):  # the last of the three files to move aside: two are moved back
        result["held"] = forked_cli(["shrink", B, "--out", out, "--quiet"], quick)
        result["held_same"] = snapshot(out) == before
    result["released"] = forked_cli(["shrink", B, "--out", out, "--quiet"])
    result["released_set"] = verified(out)
    result["model"] = json.loads((out / "report.json").read_text())["model"]
    result["stages"] = stages(TMP) + stages(out)
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"], B=models["b"])
    code, text = got["held"]
    line = error_line(text)
    assert got["refused"] and set(got["refused"]) == {str(tmp_path / "out" / "model.safetensors")}
    assert code == 2 and f"{tmp_path / 'out' / 'model.safetensors'}:" in line, text
    assert "open in another program" in line and "close any program that has it open" in line
    assert got["held_same"]
    assert got["released"][0] == 0 and got["released_set"] == ["model.onnx", "model.safetensors"]
    assert got["model"] == models["b"] and got["stages"] == []


def test_a_file_in_use_for_a_moment_is_retried(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    assert forked_cli(["shrink", A, "--out", out, "--quiet"])[0] == 0
    refusals = []

    def scanner_holds_model_onnx_for_three_tries():
        real = os.replace

        def replace(src, dst, **kw):
            if Path(src).name == "model.onnx" and len(refusals) < 3:
                refusals.append(str(src))
                raise PermissionError(13, "in use (simulated virus scanner)", str(src))
            return real(src, dst, **kw)

        os.replace = replace

    result["run"] = forked_cli(["shrink", B, "--out", out, "--quiet"], scanner_holds_model_onnx_for_three_tries)
    result["set"] = verified(out)
    result["model"] = json.loads((out / "report.json").read_text())["model"]
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"], B=models["b"])
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["run"][0] == 0, got["run"]
    assert got["set"] == ["model.onnx", "model.safetensors"] and got["model"] == models["b"]


def test_a_failure_in_the_middle_of_the_publish_is_undone(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    assert forked_cli(["shrink", A, "--out", out, "--quiet"])[0] == 0
    before = snapshot(out)

    def report_cannot_move_in():  # once; every other file is already in place by then
        real, failed = os.replace, []

        def replace(src, dst, **kw):
            if Path(dst) == out / "report.json" and Path(src).parent.name.startswith(publish.STAGE_PREFIX) \
                    and not failed:
                failed.append(src)
                raise OSError(5, "Input/output error", str(dst))
            return real(src, dst, **kw)

        os.replace = replace

    result["run"] = forked_cli(["shrink", B, "--out", out, "--quiet"], report_cannot_move_in)
    result["same"] = snapshot(out) == before
    other = Path(TMP) / "other"
    (other / "model.onnx").mkdir(parents=True)
    (other / "model.onnx" / "keep.txt").write_text("mine")
    result["dir"] = forked_cli(["shrink", B, "--out", other, "--quiet"])
    result["dir_left"] = snapshot(other / "model.onnx"), sorted(os.listdir(other))
    result["stages"] = stages(TMP) + stages(out) + stages(other)
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"], B=models["b"])
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["run"][0] == 2 and "Input/output error" in error_line(got["run"][1])
    assert got["same"]
    assert got["dir"][0] == 2 and "Is a directory" in error_line(got["dir"][1])
    kept, listing = got["dir_left"]
    assert list(kept) == ["keep.txt"] and listing == ["model.onnx"]  # nothing published, the directory untouched
    assert got["stages"] == []


def test_sigterm_and_ctrl_c_publish_nothing_or_a_complete_set(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    assert forked_cli(["shrink", A, "--out", out, "--quiet"])[0] == 0
    before = snapshot(out)

    def after_staging(sig):
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

    for sig in (signal.SIGTERM, signal.SIGINT):
        result[sig.name] = forked_cli(["shrink", B, "--out", out, "--quiet"], after_staging(sig))
        result[sig.name + "_same"] = snapshot(out) == before

    def sigterm_mid_publish():
        real = os.replace

        def replace(src, dst, **kw):
            real(src, dst, **kw)
            if Path(dst) == out / "model.onnx":  # moved in; model.safetensors and report.json not yet
                os.kill(os.getpid(), signal.SIGTERM)

        os.replace = replace

    result["mid"] = forked_cli(["shrink", B, "--out", out, "--quiet"], sigterm_mid_publish)
    result["mid_set"] = verified(out)
    result["model"] = json.loads((out / "report.json").read_text())["model"]
    result["stages"] = stages(TMP) + stages(out)
    result["numbers"] = {"SIGTERM": int(signal.SIGTERM), "SIGINT": int(signal.SIGINT)}
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"], B=models["b"])
    for name, code in (("SIGTERM", 128 + got["numbers"]["SIGTERM"]), ("SIGINT", 130)):
        assert got[name][0] == code and "nothing was published" in error_line(got[name][1]), got[name]
        assert got[name + "_same"]
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["mid"][0] == 128 + got["numbers"]["SIGTERM"] and "they are complete" in error_line(got["mid"][1])
    assert got["mid_set"] == ["model.onnx", "model.safetensors"] and got["model"] == models["b"]
    assert got["stages"] == []


def test_a_killed_run_leaves_a_hidden_stage_that_a_later_run_removes(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "new", {}

    def killed_after_staging():
        from isocompress.api import shrink as api

        real = api.write_report

        def kill(report, stage):
            real(report, stage)
            os.kill(os.getpid(), 9)  # SIGKILL: no cleanup runs (TerminateProcess on Windows)

        api.write_report = kill

    result["killed"] = forked_cli(["shrink", A, "--out", out, "--quiet"], killed_after_staging)
    result["out_exists"] = out.exists()
    result["left"] = stages(TMP)
    soon = Path(TMP) / "soon"  # a new --out, so its stage goes beside it too, where the stale one is
    result["soon"] = forked_cli(["shrink", A, "--out", soon, "--quiet"])
    result["soon_left"], result["soon_set"] = stages(TMP), verified(soon)
    old = time.time() - publish.STALE_GRACE_S - 1
    for stage in Path(TMP).glob(publish.STAGE_PREFIX + "*"):
        os.utime(stage, (old, old))
    result["later"] = forked_cli(["shrink", A, "--out", out, "--quiet"])
    result["later_left"], result["later_set"] = stages(TMP), verified(out)
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"])
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["killed"][0] == -9 and not got["out_exists"]
    assert len(got["left"]) == 1 and got["left"][0].startswith(".")
    # a stage younger than STALE_GRACE_S is left alone (its owner might not have locked it yet) ...
    assert got["soon"][0] == 0 and got["soon_left"] == got["left"]
    assert got["soon_set"] == ["model.onnx", "model.safetensors"]
    # ... and removed once older, its lock being free
    assert got["later"][0] == 0 and got["later_left"] == []
    assert got["later_set"] == ["model.onnx", "model.safetensors"]


@pytest.mark.slow
def test_concurrent_runs_never_mix_files_and_a_reader_excludes_publishes(tmp_path, models):
    got = simulated('''
    out, result = Path(TMP) / "out", {}
    plan = [([A], 0), ([B], 0), ([A, "--onnx-tol", "1e-300"], 1), ([B, "--format", "safetensors"], 0),
            ([B, "--onnx-tol", "1e-300"], 1), ([A, "--format", "safetensors"], 0)]
    children = [start(["shrink", *args, "--out", out, "--quiet"]) for args, _ in plan]
    result["runs"] = [[expected, *finish(*child)] for (_, expected), child in zip(plan, children)]
    result["set"] = verified(out)
    report = json.loads((out / "report.json").read_text())
    from isocompress.formats import io
    result["widths"] = [list(io.load(out / "model.safetensors").widths), report["widths_after"]]
    result["model"] = report["model"]
    result["listing"] = sorted(os.listdir(out))
    result["stages"] = stages(TMP) + stages(out)
    before = snapshot(out)
    with publish.read_lock(out):
        pid, log = start(["shrink", A, "--out", out, "--quiet"])
        deadline = time.time() + 120  # until its stage is sealed (report.json written): it is about to publish
        while time.time() < deadline and not any(out.glob(publish.STAGE_PREFIX + "*/report.json")):
            time.sleep(0.05)
        result["sealed_under_lock"] = time.time() < deadline
        time.sleep(2)
        result["finished_under_lock"] = os.waitpid(pid, os.WNOHANG) != (0, 0)
        result["same_under_lock"] = snapshot(out) == before
    if not result["finished_under_lock"]:
        result["after_lock"] = finish(pid, log)
        result["after_set"] = verified(out)
    emit(result)
    ''', TMP=str(tmp_path), A=models["a"], B=models["b"])
    for expected, code, text in got["runs"]:
        assert code == expected and "Traceback" not in text, text
        if expected:
            error_line(text)
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert got["set"] in (["model.onnx", "model.safetensors"], ["model.safetensors"])
    assert got["listing"] == sorted(["report.json", *got["set"]])
    assert got["widths"][0] == got["widths"][1] and got["model"] in (models["a"], models["b"])
    assert got["stages"] == []
    assert got["sealed_under_lock"] and not got["finished_under_lock"], "a publish ran while a reader held the lock"
    assert got["same_under_lock"]
    assert got["after_lock"][0] == 0 and got["after_set"] == ["model.onnx", "model.safetensors"]


def test_check_runs_its_recipes_and_leaves_nothing_behind(tmp_path, models):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    np.save(tmp_path / "calib.npy", x.numpy().astype(np.float32))
    np.save(tmp_path / "labels.npy", np.arange(64) % 3)
    (tmp_path / "half.toml").write_text('name = "half"\nversion = 1\nbudget = "50%"\nformats = ["onnx"]\n')
    (tmp_path / "isocompress.toml").write_text(textwrap.dedent(f'''
        [[check]]
        name = "exact"
        model = "a.safetensors"
        recipe = "{ROOT / 'recipes' / 'exact.toml'}"
        calibration = "calib.npy"
        labels = "labels.npy"
        max-params = 1_000
        max-error = 1e-5
        error-measure = "empirical"

        [[check]]
        name = "pruned"
        model = "b.safetensors"
        recipe = "half.toml"
        calibration = "calib.npy"
        labels = "labels.npy"
        max-params = {{LIMIT}}
        '''))
    got = simulated('''
    result, config = {}, Path(TMP) / "isocompress.toml"
    text = config.read_text()
    for limit in (100_000, 1):
        config.write_text(text.replace("{LIMIT}", str(limit)))
        before = sorted(os.listdir(TMP))
        code, output = forked_cli(["check", "--config", config, "--json", "--quiet"])
        result[str(limit)] = [code, output, before == sorted(os.listdir(TMP))]
    emit(result)
    ''', TMP=str(tmp_path))
    code, output, clean = got["100000"]
    assert got["refused"] == []  # no run replaced or removed a file in use (Windows would refuse)
    assert code == 0 and clean, output
    rows = json.loads(output)
    assert {row["name"] for row in rows} == {"exact", "pruned"} and all(row["passed"] for row in rows), rows
    code, output, clean = got["1"]
    assert code == 1 and clean, output
    failed = [row for row in json.loads(output) if not row["passed"]]
    assert [(row["name"], row["metric"]) for row in failed] == [("pruned", "params")], failed
