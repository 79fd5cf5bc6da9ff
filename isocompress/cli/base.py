"""The `isocompress` click group and its error handling. Each command registers itself on `main` from its own
module (`cli_shrink`, `cli_export`, `cli_check`, `cli_grow`); `isocompress.cli` imports them all.

User errors (`IsocompressError`) become one line on stderr and exit code 2 (1 for a failed check); never a traceback.
"""

from __future__ import annotations

import errno
import signal
import sys
import warnings
from contextlib import contextmanager

import click

from isocompress.core.errors import IsocompressError, Terminated
from isocompress.formats.publish import POSIX, present_signals, swapped_signals  # stdlib only: --help needs no torch

ADVICE = (  # errno name → what to do; a name this platform's errno lacks is left out
    ("EACCES", "check its permissions, or choose another location"),
    ("EPERM", "check its permissions, or choose another location"),
    ("EROFS", "the filesystem is read-only; choose another location"),
    ("ENAMETOOLONG", "a path component is over the filesystem's limit (255 bytes); shorten it"),
    ("ENOSPC", "the disk is full; free space or choose another --out"),
    ("EDQUOT", "the disk quota is exhausted; free space or choose another --out"),
    ("EFBIG", "the file-size limit (ulimit -f) is too small for this output; raise it or choose a smaller format"),
    ("ENOENT", "check the path"),
    ("ENOTDIR", "a component of the path is not a directory; check the path"),
    ("EISDIR", "it is a directory; give a file"),
    ("ELOOP", "too many symbolic links; check the path"),
    ("EMFILE", "too many open files; raise the limit (ulimit -n)"),
    ("EIO", "an I/O error; check the disk"),
)
OS_ADVICE = {getattr(errno, name): advice for name, advice in ADVICE if hasattr(errno, name)}
if not POSIX:  # Windows: a file another program has open can be neither replaced nor removed
    OS_ADVICE[errno.EACCES] = "close any program that has it open, check its permissions, or choose another location"


class Group(click.Group):
    """Turns the project's errors, and click's usage errors, into one line and its exit code."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            usage_error(exc)

    def invoke(self, ctx):
        try:
            with quiet_warnings(), signals_raise():
                return super().invoke(ctx)
        except click.UsageError as exc:
            usage_error(exc)
        except IsocompressError as exc:
            fail(str(exc), exc.exit_code)
        except OSError as exc:
            fail(os_error_message(exc), 2)
        except MemoryError:
            fail("out of memory; free memory, raise the limit, or use a smaller model or input", 2)
        except RecursionError:
            fail("an input is nested too deeply to process; simplify it", 2)
        except RuntimeError as exc:
            if not is_allocation_failure(exc):
                raise
            fail(f"out of memory ({allocation_size(str(exc))}); free memory, raise the limit, or use a smaller model", 2)
        except KeyboardInterrupt as exc:
            fail(f"interrupted; {_what_was_published(exc)}", 130)
        except Terminated as exc:
            fail(f"terminated by signal {exc.signum}; {_what_was_published(exc)}", 128 + exc.signum)


def _what_was_published(exc: BaseException) -> str:
    if getattr(exc, "published", False):
        return "the signal arrived while the outputs were being published; they are complete"
    return "nothing was published (the previous outputs are unchanged)"


def one_line(text: str) -> str:
    """Control characters (a newline in a path) escaped, so a message is always one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def fail(message: str, code: int) -> None:
    click.echo(f"isocompress: error: {one_line(message)}", err=True)
    sys.exit(code)


def os_error_message(exc: OSError) -> str:
    """An operating-system error as 'PATH: what went wrong; what to do'."""
    what = exc.strerror or type(exc).__name__
    advice = OS_ADVICE.get(exc.errno, "check the path and the disk")
    where = exc.filename if exc.filename is not None else "(output)"
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {what}; {advice}"


def allocation_size(text: str) -> str:
    import re

    found = re.search(r"allocate (\d+) bytes", text)
    return f"an allocation of {int(found.group(1)):,} bytes failed" if found else "an allocation failed"


def is_allocation_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return "can't allocate memory" in text or "out of memory" in text or "failed to allocate" in text


@contextmanager
def quiet_warnings():
    """numpy and torch warnings (overflow, deprecations) never reach the terminal: errors are reported as one line."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextmanager
def signals_raise():
    """SIGTERM (what `timeout` and CI cancellation send) and SIGHUP raise, so that a run's cleanup runs; SIGXFSZ
    is ignored, so that a file-size limit is an EFBIG error instead of a kill. Where a signal does not exist it is
    left out (Windows has neither SIGHUP nor SIGXFSZ; its Ctrl-Break, SIGBREAK, raises as SIGHUP does)."""
    wanted = {sig: _raise_terminated for sig in present_signals("SIGTERM", "SIGHUP", "SIGBREAK")}
    wanted.update({sig: signal.SIG_IGN for sig in present_signals("SIGXFSZ")})
    with swapped_signals(wanted):
        yield


def usage_error(exc: click.UsageError) -> None:
    """One line instead of click's usage block; exit code 2 as click's own."""
    sub = exc.ctx.command_path.split()[1:] if exc.ctx is not None else []
    command = " ".join(["isocompress", *sub])
    message = " ".join(exc.format_message().split()).rstrip(".")
    fail(f"{command}: {message}; see '{command} --help'", 2)


REF_HELP = ("How a reference IsotropicTanhMLP checkpoint stores activation.N.intrinsic_length: log (log o, its default"
            " positive_intrinsic_length=True) or raw (o itself, positive_intrinsic_length=False) [default: log, with a"
            " note on stderr].")


def threads_option(command):
    """--threads N on a command that computes (isocompress.core.threads: 1 thread for small work, up to N idle cores for
    large factorisations)."""
    return click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Most threads for large matrix work [default: $OMP_NUM_THREADS, else the available"
                             " cores]; small work always uses 1.")(command)


def start_threads(n_threads: int | None) -> None:
    from isocompress.core import threads

    threads.configure(n_threads)


@click.group(cls=Group)
@click.version_option(package_name="isocompress")
def main() -> None:
    """Compress isotropic neural networks exactly (and, with a budget, with certified error bounds)."""
