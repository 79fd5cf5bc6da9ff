"""Thread choice (issue 12): 1 thread for small work, up to the limit (--threads, OMP_NUM_THREADS, the affinity's
cores) and never more than the idle cores for large factorisations."""

import os

import pytest
import torch
from click.testing import CliRunner

from isocompress.cli import main
from isocompress.core import threads


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    return monkeypatch


def test_thread_limit_precedence(clean_env):
    assert threads.available_cores() == 6 and threads.thread_limit() == 6
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.thread_limit() == 3
    clean_env.setenv(threads.ENV, "2")
    assert threads.thread_limit() == 2
    assert threads.thread_limit(5) == 5
    clean_env.setenv(threads.ENV, "zero")  # unreadable values are ignored
    clean_env.setenv("OMP_NUM_THREADS", "0")
    assert threads.thread_limit() == 6


def test_small_work_gets_one_thread_and_large_work_the_idle_cores(clean_env):
    clean_env.setattr(threads, "idle_cores", lambda: 4)
    assert threads.threads_for(threads.LARGE_MATRIX - 1) == 1
    assert threads.threads_for(threads.LARGE_MATRIX) == 4  # idle cores, below the limit 6
    assert threads.threads_for(threads.LARGE_MATRIX, limit=2) == 2
    assert threads.threads_for(10 ** 6, limit=1) == 1
    clean_env.setattr(threads, "idle_cores", lambda: 1)  # a busy machine: one thread even for a big SVD
    assert threads.threads_for(10 ** 6) == 1


def test_idle_cores_is_within_the_affinity():
    assert 1 <= threads.idle_cores() <= threads.available_cores()


def test_using_sets_and_restores():
    before = torch.get_num_threads()
    with threads.using(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with threads.using(1):
            raise RuntimeError("restored even on an error")
    assert torch.get_num_threads() == before


def test_threads_option_is_validated_and_configures(tmp_path, monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    bad = CliRunner().invoke(main, ["shrink", str(tmp_path / "m.pt"), "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output
    before = torch.get_num_threads()
    try:
        assert threads.configure(3) == 3 and os.environ[threads.ENV] == "3" and torch.get_num_threads() == 1
    finally:
        monkeypatch.delenv(threads.ENV, raising=False)
        torch.set_num_threads(before)
