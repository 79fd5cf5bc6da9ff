"""Progress on stderr (issue 12): plain lines with what, how far and elapsed when stderr is not a terminal; the prune
bar has a total."""

import io
import re

import pytest

from isocompress.core.progress import line_printer, plain_line, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with progress_bar(4, "shrink", enabled=True, stream=out) as step:
        step("remove constants 0")
        step("diagonalise 1", 3)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert re.fullmatch(r"shrink: 1/4 steps \(25%\), remove constants 0, \d+\.\d s", lines[0]), lines
    assert re.fullmatch(r"shrink: 3/4 steps \(75%\), diagonalise 1, \d+\.\d s", lines[1]), lines


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    tty = Terminal()
    with progress_bar(2, "shrink", enabled=True, stream=tty) as step:
        step("a")
    assert "\r" in tty.getvalue() and "shrink" in tty.getvalue()
    quiet = io.StringIO()
    with progress_bar(2, "shrink", enabled=False, stream=quiet) as step:
        step("a")
    assert quiet.getvalue() == ""


def test_plain_line_without_a_total_and_line_printer():
    assert plain_line("prune", 3, None, "step", "", 1.25) == "prune: 3 steps, 1.2 s"
    out = io.StringIO()
    line_printer(out)("check 1/2: m.pt: loading")
    assert re.fullmatch(r"check 1/2: m\.pt: loading, \d+\.\d s\n", out.getvalue())


def test_the_prune_progress_has_a_total(capsys):
    from isocompress.api import shrink as api
    from isocompress.core.model import random_model
    from isocompress.prune import budget as prune

    model = random_model([24, 24, 24, 4], seed=1)
    prune.prune_to_budget(model, api.ShrinkOptions(budget=0.3), progress=True, search_restarts=4, search_steps=5)
    lines = capsys.readouterr().err.splitlines()
    assert lines, "no progress lines"
    parsed = [re.fullmatch(r"prune: ([\d,]+)/([\d,]+) parameters \((\d+)%\), ([\d,]+) parameters, \d+\.\d s", l)
              for l in lines]
    assert all(parsed), lines
    totals = {m.group(2) for m in parsed}
    assert len(totals) == 1 and int(totals.pop().replace(",", "")) > 0
    done = [int(m.group(1).replace(",", "")) for m in parsed]
    assert done == sorted(done) and done[-1] >= 1


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
