"""Every code block in README.md and docs/*.md runs as written (issue 11).

THE RULE (for everyone who writes docs; docs/api.md repeats it):
  * A fenced block runs when its language (the first word after the backticks) is `python`, `bash` or `sh`.
    Every other language is shown, never run: use `console` for a command with its output, `text` for output or a
    signature, `toml`/`yaml`/`json` for files.
  * A word after the language modifies it: `python no-run` / `bash no-run` is shown but not run (the README's setup
    commands, which create the environment this test runs in; anything that needs the network or code we do not
    ship; a command CI already runs as its own step, such as the full `isocompress check`); `slow` marks a
    block that takes more than a few seconds: its whole page then runs in the slow test below (CI runs it too).
  * The blocks of one document run in order, in one fresh temporary directory holding a copy of the repository's
    models/, recipes/, benchmarks/, scripts/ and isocompress.toml, so a later block may use what an earlier one wrote
    (as a reader following the page would). Python blocks run each in its own interpreter; bash blocks with
    `set -euo pipefail`. The environment is this test's: the README's command 2 (a superset of command 1 plus the
    extras the docs name), with `python` and `isocompress` of this interpreter first on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash"}
COPIED = ("models", "recipes", "benchmarks", "scripts", "isocompress.toml")
FENCE = re.compile(r"^(?P<fence>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.S | re.M)
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    language: str  # "python" or "bash"
    body: str
    slow: bool

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        words = match.group("info").split()
        if not words or words[0] not in RUN_LANGUAGES or "no-run" in words[1:]:
            continue
        line = text[:match.start()].count("\n") + 1
        found.append(Block(doc, line, RUN_LANGUAGES[words[0]], match.group("body"), "slow" in words[1:]))
    return found


def run_block(block: Block, workdir: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    if block.language == "python":
        script = workdir / f".block-{block.line}.py"
        script.write_text(block.body, encoding="utf-8")
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-c", "set -euo pipefail\n" + block.body]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (
        f"{block.where}: the {block.language} block exited {result.returncode}\n--- block ---\n{block.body}"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    )


def fresh_copy(tmp_path: Path) -> Path:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, tmp_path / name)
    return tmp_path


def documents(slow: bool) -> list[Path]:
    """The documents with runnable blocks: those with a `slow` block (slow=True) or without one (slow=False)."""
    return [doc for doc in DOCS if blocks_of(doc) and any(b.slow for b in blocks_of(doc)) == slow]


@pytest.mark.parametrize("doc", documents(slow=False), ids=lambda p: p.name)
def test_blocks_run_as_written(doc, tmp_path):
    workdir = fresh_copy(tmp_path)
    for block in blocks_of(doc):
        run_block(block, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("doc", documents(slow=True), ids=lambda p: p.name)
def test_blocks_of_pages_with_slow_ones_run_as_written(doc, tmp_path):
    workdir = fresh_copy(tmp_path)
    for block in blocks_of(doc):
        run_block(block, workdir)


def test_the_rule_sees_the_blocks_it_should():
    """The extractor itself: languages, modifiers and line numbers, on a made-up page."""
    page = ROOT / "tests" / ".docs-rule-probe.md"
    try:
        page.write_text("x\n```python\nprint(1)\n```\n```console\n$ ls\n```\n```bash no-run\npip install x\n```\n"
                        "```sh slow\necho hi\n```\n````python\n```\nnested fence text\n```\n````\n", encoding="utf-8")
        found = blocks_of(page)
    finally:
        page.unlink(missing_ok=True)
    assert [(b.line, b.language, b.slow) for b in found] == [(2, "python", False), (11, "bash", True),
                                                              (14, "python", False)]
    assert found[2].body == "```\nnested fence text\n```\n"
