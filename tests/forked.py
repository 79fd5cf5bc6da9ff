"""Running the CLI in a forked child of the test process: a separate process (its own signals, limits, file
descriptors and flocks) without the cost of starting an interpreter and importing torch again."""

import os
import sys
import tempfile
from pathlib import Path


def _child(args, setup, log: Path) -> None:
    code = 3
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        if setup is not None:
            setup()
        from isocompress.cli import main

        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 3
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 4
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def start(args, setup=None) -> tuple[int, Path]:
    """Forks a child running `isocompress ARGS` (after `setup()`, in the child); returns (pid, its output file)."""
    fd, log = tempfile.mkstemp(prefix="isocompress-forked-", suffix=".log")
    os.close(fd)
    pid = os.fork()
    if pid == 0:
        _child(args, setup, Path(log))
    return pid, Path(log)


def finish(pid: int, log: Path) -> tuple[int, str]:
    """(exit code, or −signal if killed; stdout+stderr) of a started child."""
    _, status = os.waitpid(pid, 0)
    text = log.read_text()
    log.unlink()
    return os.waitstatus_to_exitcode(status), text


def forked_cli(args, setup=None) -> tuple[int, str]:
    return finish(*start(args, setup))
