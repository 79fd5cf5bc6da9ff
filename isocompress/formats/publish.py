"""Publishing a run's outputs all-or-nothing (issue 13).

A command that writes an output directory OUT never writes into it directly. It writes every output into a private
stage directory (`.isocompress-stage-XXXXXXXX/`, hidden, inside OUT when OUT exists, else beside it), writes
report.json there with the sha256 of every other file, verifies the hashes, and then publishes under an exclusive
`fcntl.flock` on OUT's parent directory (without fcntl, see Platforms below):

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

Platforms (docs/ci.md, "Outputs are all-or-nothing"). POSIX systems (Linux, macOS, the BSDs) have `fcntl`, and the
above is what they run. Without it (Windows) the same steps run with these differences, each for a reason of that
platform:

  * the lock is filelock's native lock (LockFileEx there) on a lock file, `.isocompress-publish.lock` in OUT's parent
    directory, because a directory cannot be locked; Windows removes it again after the publish. Readers take the
    same, exclusive lock: they exclude each other as well as publishes (there is no shared lock to take);
  * Windows refuses to replace or remove a file that another program has open. So a publish first moves every file
    it replaces or removes (report.json first) into the stage, then moves the new files in, report.json last; if any
    move fails, the moves made are undone and the previous set is back as it was. A move that fails because a file
    is in use is retried for REPLACE_RETRY_S seconds (virus scanners and indexers open new files briefly);
  * a stage whose `.owner` lock is free is stale only once it is STALE_GRACE_S old: its owner creates `.owner` and
    then locks it (a file cannot be renamed while open there, so it cannot be locked first and named after), and a
    young stage may be between the two steps;
  * directories are not fsync'ed (they cannot be opened there; NTFS journals its metadata).

`POSIX` (whether `fcntl` imports) selects the branch; the suite runs the other one on Linux by making that import fail
in a subprocess (tests/test_platforms.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from isocompress.core.errors import IsocompressError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

POSIX = fcntl is not None  # see "Platforms" above

STAGE_PREFIX = ".isocompress-stage-"
OWNER = ".owner"
REPORT = "report.json"
ORPHAN_AGE_S = 600  # a stage without an .owner file (killed between mkdtemp and locking) is stale after this
LOCK_FILE = ".isocompress-publish.lock"  # without fcntl only: what is locked instead of OUT's parent directory
STALE_GRACE_S = 60  # without fcntl only: a stage younger than this may not have locked its .owner yet
REPLACE_RETRY_S = 5.0  # without fcntl only: how long a move of a file in use is retried


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- locks -----------------------------------------------------------------------------------------------------------
@contextmanager
def _flock(directory: Path, mode: int) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def _native_lock(path: Path) -> Iterator[None]:
    """Without fcntl: an exclusive lock on the file `path` (created if missing), by filelock's native primitive
    (LockFileEx on byte 0 on Windows); blocks until it is free. The OS releases it when the process dies."""
    from filelock import lock_descriptor, unlock_descriptor

    fd = _retrying(os.open, path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666, shown=path)
    try:
        lock_descriptor(fd, blocking=True, poll_interval=0.02)
        try:
            yield
        finally:
            unlock_descriptor(fd)
    finally:
        os.close(fd)
        if os.name == "nt":  # fails while another run has the file open (it is then theirs to remove), so unlike
            # with flock, removing it cannot let two runs lock two different files
            with suppress(OSError):
                os.unlink(path)


def _lock_dir(out: Path) -> Path:
    return Path(os.path.abspath(out)).parent


@contextmanager
def _publish_lock(out: Path, shared: bool = False) -> Iterator[None]:
    """What a publish into OUT holds exclusively, and a reader shared (exclusive too without fcntl)."""
    if POSIX:
        with _flock(_lock_dir(out), fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            yield
    else:
        with _native_lock(_lock_dir(out) / LOCK_FILE):
            yield


@contextmanager
def read_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold while reading OUT's files: no publish into OUT runs meanwhile."""
    with _publish_lock(Path(out), shared=True):
        yield


def _try_lock(fd: int) -> bool:
    """An exclusive lock on fd without waiting; False when another process holds one (or it cannot be taken)."""
    try:
        if POSIX:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        from filelock import lock_descriptor

        return lock_descriptor(fd, blocking=False)
    except OSError:
        return False


def _unlock(fd: int) -> None:
    """Releases a lock taken on fd before the fd is closed (closing is enough for flock; Windows asks for this)."""
    if not POSIX:
        from filelock import unlock_descriptor

        with suppress(OSError):
            unlock_descriptor(fd)


# --- stages ----------------------------------------------------------------------------------------------------------
def remove_stale_stages(location: Path) -> None:
    """Remove stages in `location` whose owner has died (its lock on .owner is free)."""
    try:
        entries = [p for p in location.iterdir() if p.name.startswith(STAGE_PREFIX) and p.is_dir()]
    except OSError:
        return
    for stage in entries:
        if _is_stale(stage):
            shutil.rmtree(stage, ignore_errors=True)


def _is_stale(stage: Path) -> bool:
    """No live run owns `stage`: its .owner is not locked (without fcntl: and the stage is STALE_GRACE_S old), or it
    has no .owner and is ORPHAN_AGE_S old."""
    try:
        age = time.time() - stage.stat().st_mtime
    except OSError:
        return False
    if not POSIX and age < STALE_GRACE_S:
        return False  # its owner may be between creating .owner and locking it
    try:
        fd = os.open(stage / OWNER, os.O_RDONLY)
    except FileNotFoundError:
        return age > ORPHAN_AGE_S
    except OSError:
        return False
    try:
        free = _try_lock(fd)
        if free:
            _unlock(fd)
        return free
    finally:
        os.close(fd)


def _claim(stage: Path) -> int:
    """Creates and locks stage/.owner, the mark of a live stage; returns its fd (closing it ends the claim)."""
    if POSIX:
        # lock first, then give the file its name: another run never sees an unlocked .owner of a live stage
        fd = os.open(stage / ".owner.tmp", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(stage / ".owner.tmp", stage / OWNER)
        return fd
    from filelock import lock_descriptor

    # an open file cannot be renamed on Windows: created, then locked; _is_stale leaves so young a stage alone
    fd = os.open(stage / OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    lock_descriptor(fd, blocking=True)
    return fd


class Stage:
    """A private directory for one run's outputs; `publish` moves them into OUT."""

    def __init__(self, out: Path):
        self.out = out
        location = out if out.is_dir() else Path(os.path.abspath(out)).parent
        remove_stale_stages(location)
        self.dir = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=location))
        self._owner_fd = _claim(self.dir)

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
        replace(tmp, path)
        return hashes

    def publish(self) -> None:
        hashes = self.seal()
        for name, digest in hashes.items():  # verify what is about to be published
            if sha256(self.dir / name) != digest:
                raise IsocompressError(f"{self.dir / name}: changed while staged; run again")
        with _publish_lock(self.out):
            if POSIX:
                self._replace_in_place(hashes)
            else:
                self._move_with_undo(hashes)

    def _replace_in_place(self, hashes: dict[str, str]) -> None:
        """Each rename replaces its target atomically; report.json is removed first and renamed in last."""
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

    def _move_with_undo(self, hashes: dict[str, str]) -> None:
        """Without fcntl (Windows: a file in use cannot be replaced or removed). The files leaving OUT move into the
        stage, report.json first; then the new ones move in, report.json last. A move that fails undoes those
        before it, so the previous set is back as it was; the stage (with the old files) is removed afterwards."""
        created = not self.out.is_dir()
        self.out.mkdir(exist_ok=True)
        previous = _previous_hashes(self.out)
        leaving = [REPORT, *hashes, *(n for n, d in previous.items() if n not in hashes and _matches(self.out / n, d))]
        aside = Path(tempfile.mkdtemp(prefix=".previous-", dir=self.dir))
        done: list[tuple[Path, Path]] = []
        try:
            for name in leaving:
                if _replaceable(self.out / name):
                    _move(self.out / name, aside / name, done, shown=self.out / name)
            for name in [*hashes, REPORT]:
                _move(self.dir / name, self.out / name, done, shown=self.out / name)
        except BaseException:
            _undo(done)
            if created:
                with suppress(OSError):
                    self.out.rmdir()
            raise

    def close(self) -> None:
        if POSIX:
            shutil.rmtree(self.dir, ignore_errors=True)
            _close_quietly(self._owner_fd)
        else:  # an open file cannot be removed there: .owner is released first
            _unlock(self._owner_fd)
            _close_quietly(self._owner_fd)
            shutil.rmtree(self.dir, ignore_errors=True)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# --- moving files ----------------------------------------------------------------------------------------------------
def _retrying(action: Callable, *args, shown: str | os.PathLike):
    """action(*args). Without fcntl (Windows), a PermissionError (a file in use: a viewer, a virus scanner, an indexer)
    is retried for REPLACE_RETRY_S seconds and then raised naming `shown`."""
    if POSIX:
        return action(*args)
    deadline = time.monotonic() + REPLACE_RETRY_S
    pause = 0.01
    while True:
        try:
            return action(*args)
        except PermissionError as exc:
            if time.monotonic() + pause > deadline:
                raise PermissionError(exc.errno, f"{exc.strerror} (for {REPLACE_RETRY_S:g} s: is it open in another"
                                      " program?)", os.fspath(shown)) from None
        time.sleep(pause)
        pause = min(2 * pause, 0.25)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """os.replace(src, dst); without fcntl (Windows) retried while a file is in use (see `_retrying`)."""
    _retrying(os.replace, src, dst, shown=dst)


def discard(path: str | os.PathLike) -> None:
    """Removes a temporary file of ours. Without fcntl (Windows) retried while it is in use, then left: a hidden
    temporary left over is better than hiding the error being raised."""
    if POSIX:
        os.unlink(path)
        return
    with suppress(OSError):
        _retrying(os.unlink, path, shown=path)


def _replaceable(path: Path) -> bool:
    """Whether something stands at `path` to move aside; a directory there is an error (never moved, never removed)."""
    if path.is_symlink() or path.is_file():
        return True
    if path.exists():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    return False


def _move(src: Path, dst: Path, done: list[tuple[Path, Path]], shown: Path) -> None:
    _retrying(os.replace, src, dst, shown=shown)
    done.append((src, dst))


def _undo(done: list[tuple[Path, Path]]) -> None:
    """Moves back, last first; what cannot move back is left (the set then lacks report.json, as after a kill)."""
    for src, dst in reversed(done):
        with suppress(OSError):
            _retrying(os.replace, dst, src, shown=src)


def stage_hashes(stage: Path) -> dict[str, str]:
    """sha256 of every file a stage will publish (all but its .owner, temporaries and report.json)."""
    names = sorted(p.name for p in Path(stage).iterdir()
                   if p.name not in (OWNER, REPORT) and not p.name.startswith(".") and p.is_file())
    return {name: sha256(Path(stage) / name) for name in names}


def _previous_hashes(out: Path) -> dict:
    try:
        data = json.loads((out / REPORT).read_text())
        hashes = data.get("sha256", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in hashes.items() if isinstance(k, str) and isinstance(v, str) and _plain_name(k)}
    except (OSError, ValueError, RecursionError):
        return {}


def _plain_name(name: str) -> bool:
    """A file directly in OUT: no separator of any platform (a report may say '..\\x', a path on Windows), no drive or
    stream colon, not '.', '..' or report.json."""
    return name not in ("", ".", "..", REPORT) and re.search(r"[/\\:\x00]", name) is None


def _matches(path: Path, digest: str) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and sha256(path) == digest
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY if POSIX else os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows flushes writable fds
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


def present_signals(*names: str) -> set[int]:
    """The named signals this platform has (Windows: no SIGHUP, SIGXFSZ; SIGBREAK, its Ctrl-Break, only there)."""
    return {getattr(signal, name) for name in names if hasattr(signal, name)}


DEFERRED_SIGNALS = present_signals("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK")


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Defers SIGTERM, SIGINT and SIGHUP (SIGBREAK on Windows) during the block (a few renames): a signal that arrives
    meanwhile is recorded and handed to the previous handler when the block ends. (pthread_sigmask would not do:
    onnxruntime's and torch's threads would take the signal.)"""
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
            rest = re.split(r"[\\/]", text.split(STAGE_PREFIX, 1)[1], maxsplit=1)
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
