"""Publishing a run's outputs all-or-nothing (issue 13).

A command that writes an output directory OUT never writes into it directly. It writes every output into a private
stage directory (`.isocompress-stage-XXXXXXXX/`, hidden, inside OUT when OUT exists, else beside it), writes
report.json there with the sha256 of every other file, verifies the hashes, and then publishes under an exclusive
`fcntl.flock` on OUT's parent directory:

  1. report.json of the previous set is removed (from now on OUT holds no report: a set in transit);
  2. the new files are renamed into OUT (same filesystem, so each rename is atomic), in sorted order;
  3. files of the previous set that the new set does not have are removed — only those the previous report.json
     lists with a sha256 that still matches (files this tool wrote; nothing else is ever removed);
  4. report.json is renamed into OUT last.

Reader's guarantee: whenever OUT/report.json exists, the files it lists under "sha256" are complete and are exactly
the ones it describes, unless a later publish has started since; `verify(OUT)` checks the hashes, and a reader that
holds `read_lock(OUT)` (a shared flock on the same lock) sees no publish in progress. A run that fails or is
interrupted (an exception, Ctrl-C, SIGTERM) publishes nothing, removes its stage, and leaves the previous set
untouched; OUT itself is created only at publish time. A run killed by SIGKILL leaves only its hidden stage, which the
next run in the same place removes (a stage is stale when no process holds the flock on its `.owner` file).
Concurrent runs into one OUT each publish a complete set in turn; the last to publish wins.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from isocompress.core.errors import IsocompressError

STAGE_PREFIX = ".isocompress-stage-"
OWNER = ".owner"
REPORT = "report.json"
ORPHAN_AGE_S = 600  # a stage without an .owner file (killed between mkdtemp and locking) is stale after this


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _flock(directory: Path, mode: int) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _lock_dir(out: Path) -> Path:
    return Path(os.path.abspath(out)).parent


@contextmanager
def read_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold while reading OUT's files: no publish into OUT runs meanwhile."""
    with _flock(_lock_dir(Path(out)), fcntl.LOCK_SH):
        yield


def remove_stale_stages(location: Path) -> None:
    """Remove stages in `location` whose owner has died (its flock on .owner is free)."""
    try:
        entries = [p for p in location.iterdir() if p.name.startswith(STAGE_PREFIX) and p.is_dir()]
    except OSError:
        return
    for stage in entries:
        owner = stage / OWNER
        try:
            fd = os.open(owner, os.O_RDONLY)
        except FileNotFoundError:
            try:
                if time.time() - stage.stat().st_mtime > ORPHAN_AGE_S:
                    shutil.rmtree(stage, ignore_errors=True)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # alive
        finally:
            os.close(fd)
        shutil.rmtree(stage, ignore_errors=True)


class Stage:
    """A private directory for one run's outputs; `publish` moves them into OUT."""

    def __init__(self, out: Path):
        self.out = out
        location = out if out.is_dir() else Path(os.path.abspath(out)).parent
        remove_stale_stages(location)
        self.dir = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=location))
        # lock first, then give the file its name: another run never sees an unlocked .owner of a live stage
        self._owner_fd = os.open(self.dir / ".owner.tmp", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX)
        os.rename(self.dir / ".owner.tmp", self.dir / OWNER)

    def seal(self) -> dict:
        """Makes sure the staged report.json holds {"sha256": {name: hash}} of every staged file."""
        hashes = stage_hashes(self.dir)
        path = self.dir / REPORT
        report = json.loads(path.read_text()) if path.exists() else {}
        if report.get("sha256") == hashes:
            return hashes
        report["sha256"] = hashes
        tmp = self.dir / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        _fsync(tmp)
        os.replace(tmp, path)
        return hashes

    def publish(self) -> None:
        hashes = self.seal()
        for name, digest in hashes.items():  # verify what is about to be published
            if sha256(self.dir / name) != digest:
                raise IsocompressError(f"{self.dir / name}: changed while staged; run again")
        with _flock(_lock_dir(self.out), fcntl.LOCK_EX):
            self.out.mkdir(exist_ok=True)
            previous = _previous_hashes(self.out)
            old_report = self.out / REPORT
            if old_report.exists() or old_report.is_symlink():
                old_report.unlink()
            for name in hashes:
                os.replace(self.dir / name, self.out / name)
            for name, digest in previous.items():
                if name not in hashes and _matches(self.out / name, digest):
                    (self.out / name).unlink()
            os.replace(self.dir / REPORT, self.out / REPORT)
            _fsync_dir(self.out)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.close(self._owner_fd)
        except OSError:
            pass


def stage_hashes(stage: Path) -> dict[str, str]:
    """sha256 of every file a stage will publish (all but its .owner, temporaries and report.json)."""
    names = sorted(p.name for p in Path(stage).iterdir()
                   if p.name not in (OWNER, REPORT) and not p.name.startswith(".") and p.is_file())
    return {name: sha256(Path(stage) / name) for name in names}


def _previous_hashes(out: Path) -> dict:
    try:
        data = json.loads((out / REPORT).read_text())
        hashes = data.get("sha256", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in hashes.items() if isinstance(k, str) and isinstance(v, str) and "/" not in k
                and k not in ("", ".", "..", REPORT)}
    except (OSError, ValueError, RecursionError):
        return {}


def _matches(path: Path, digest: str) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and sha256(path) == digest
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass


@contextmanager
def staged(out: str | os.PathLike) -> Iterator[Stage]:
    """A stage for OUT; published when the block ends normally, removed (nothing published) when it raises."""
    out = Path(out)
    created = _make_parents(out)
    try:
        stage = Stage(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield stage
        with signals_deferred():  # a SIGTERM or Ctrl-C mid-publish would leave a set without report.json
            stage.publish()
            published = True
    except BaseException as exc:
        stage.close()
        if not locals().get("published"):
            _remove_empty(created)
        else:
            exc.published = True  # the signal arrived during the publish, which completed first
        raise
    stage.close()


DEFERRED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Defers SIGTERM, SIGINT and SIGHUP during the block (a few renames): a signal that arrives meanwhile is recorded
    and handed to the previous handler when the block ends. (pthread_sigmask would not do: onnxruntime's and torch's
    threads would take the signal.)"""
    pending: list[int] = []

    def record(signum, frame):
        pending.append(signum)

    previous = None
    try:
        with swapped_signals({sig: record for sig in DEFERRED_SIGNALS}) as previous:
            yield
    finally:
        if pending and previous is not None:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


@contextmanager
def swapped_signals(wanted: dict) -> Iterator[dict | None]:
    """Installs `wanted` (signal → handler) for the block and restores the previous handlers after it; yields those
    (None outside the main thread, where signals cannot be handled: the block then runs as it is)."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    except ValueError:
        yield None
        return
    try:
        yield previous
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _make_parents(out: Path) -> list[Path]:
    """Creates OUT's missing parent directories (not OUT itself); returns them, deepest first."""
    created = []
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for path in reversed(created):
        path.mkdir(exist_ok=True)
    return created


def _remove_empty(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.rmdir()  # only if empty: never removes anything another run wrote
        except OSError:
            pass


def name_the_target(exc: OSError, out: Path) -> OSError:
    """The same error naming OUT (or OUT/file) instead of a private stage path, or naming OUT where it named nothing."""
    def public(name):
        if name is None:
            return str(out)
        text = os.fsdecode(name)
        if STAGE_PREFIX in text:
            rest = text.split(STAGE_PREFIX, 1)[1].split(os.sep, 1)
            return str(out / rest[1].lstrip(".")) if len(rest) > 1 and rest[1] else str(out)
        return text
    return OSError(exc.errno, exc.strerror, public(exc.filename))


def verify(out: str | os.PathLike) -> dict:
    """Checks OUT's report.json against its files; returns the report. Raises IsocompressError on any mismatch."""
    out = Path(out)
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError) as exc:
        raise IsocompressError(f"{out / REPORT}: unreadable ({exc}); the set is incomplete") from None
    for name, digest in report.get("sha256", {}).items():
        if not _matches(out / name, digest):
            raise IsocompressError(f"{out / name}: does not match report.json's sha256; the set is inconsistent")
    return report
