"""The project's own error types. The CLI turns them into one line on stderr and an exit code."""


class IsocompressError(Exception):
    """A user or input error: bad file, bad option, bad config. The CLI exits with code 2."""

    exit_code = 2

    def __init__(self, message: str = "", *args):
        # control characters (a newline in a file name) escaped: a message is always one line (issue 13)
        text = str(message)
        if not text.isprintable():
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        super().__init__(text, *args)


class CheckFailed(IsocompressError):
    """A check or verification ran and failed (a limit exceeded, an export that does not match). Exit code 1."""

    exit_code = 1


class BudgetUnreachable(IsocompressError):
    """A budget below the smallest size pruning can reach (exit code 2); a sweep records it as that row's result."""


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM/SIGHUP handler so that cleanup (removing a stage) runs before the exit."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = int(signum)
