"""Adaptive training under DDP (isocompress.train.distributed): 2 gloo processes on CPU.

One spawned pair of processes per scenario (tests/ddp_workers.py); the tests compare what the ranks returned, tensor
by tensor, here in the parent. Every run has a deadline, and every collective a timeout, so a hung process group
fails the test instead of hanging the suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ddp_workers
import pytest
import torch
from torch.nn import DataParallel

from isocompress.core.errors import IsocompressError
from isocompress.train.adapt import Neuroadaptation
from isocompress.train.distributed import rank_difference, rewrap, run_local
from isocompress.train.nn import IsotropicMLP

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 120  # the whole scenario; a collective alone fails after 30 s


def run_pair(worker, *args):
    return run_local(worker, 2, *args, timeout_s=DEADLINE_S, collective_timeout_s=30)


@pytest.fixture(scope="module")
def scenarios():
    return run_pair(ddp_workers.scenarios)


@pytest.fixture
def ranks(scenarios):
    return [results["restructuring"] for results in scenarios]


def max_difference(a, b) -> float:
    """The largest |a − b| over two snapshots (parameters and every optimiser state value); inf if shapes differ."""
    pairs = list(zip(a["params"], b["params"]))
    for state_a, state_b in zip(a["state"], b["state"]):
        assert state_a.keys() == state_b.keys()
        pairs += [(state_a[key], state_b[key]) for key in state_a]
    if a["widths"] != b["widths"] or any(x.shape != y.shape for x, y in pairs):
        return float("inf")
    return max(float((x.to(torch.float64) - y.to(torch.float64)).abs().max()) for x, y in pairs)


def test_every_parameter_and_state_tensor_is_identical_after_each_change(ranks):
    zero, one = ranks
    for stage in ("before", "after_grow", "after_diagonalise", "after_degenerate", "final"):
        assert max_difference(zero[stage], one[stage]) == 0, stage
        assert all(len(state) > 0 for state in zero[stage]["state"]), stage  # Adam's moments were compared
    assert zero["after_grow"]["widths"] == [6, 7, 5, 4] and zero["after_degenerate"]["widths"] == [6, 7, 3, 4]
    assert zero["history"] == one["history"] and len(zero["history"]) >= 2
    assert {kind for kind, *_ in zero["history"]} == {"grow", "degenerate"}
    assert zero["rank_difference"] == one["rank_difference"] == 0
    assert zero["state_difference"] == one["state_difference"] == 0


def test_without_the_broadcast_the_ranks_diverge(ranks):
    """The controls: the same changes made on each rank alone (per-rank random growth, another machine's SVD signs
    and rounding) leave the ranks different, so the test above can fail."""
    zero, one = ranks
    for change in ("grow", "diagonalise", "degenerate"):
        assert max_difference(zero[f"control_{change}"], one[f"control_{change}"]) > 0, change


def test_a_rewrapped_ddp_averages_gradients_and_a_stale_one_does_not(ranks):
    zero, one = ranks
    for a, b in zip(zero["rewrapped_grads"], one["rewrapped_grads"]):
        assert torch.equal(a, b)
    for synced, mine, theirs in zip(zero["rewrapped_grads"], zero["local_grads"], one["local_grads"]):
        assert float((synced - (mine + theirs) / 2).abs().max()) <= 1e-12 * float(synced.abs().max())
    assert any(not torch.equal(a, b) for a, b in zip(zero["stale_grads"], one["stale_grads"]))
    assert zero["settings"] == [float(2**20), 0.0]  # bucket_cap_mb=1 and find_unused_parameters carried over


def test_a_decision_that_fails_on_rank_0_fails_every_rank(ranks):
    zero, one = ranks
    assert zero["failure"] == "ZeroDivisionError: division by zero"
    assert one["failure"].startswith("rank 0 failed while deciding a restructuring")


def test_two_processes_match_one_with_the_same_global_batch(scenarios):
    """Rows of each global batch split over 2 ranks: the same decisions, and the same model up to the rounding of
    DDP's averaging."""
    one = ddp_workers.global_batch(0, 1)
    pair = [results["global_batch"] for results in scenarios]
    assert pair[0]["history"] == pair[1]["history"] == one["history"]
    assert {kind for kind, *_ in one["history"]} == {"grow", "degenerate"}
    for p0, p1, single in zip(pair[0]["params"], pair[1]["params"], one["params"]):
        assert torch.equal(p0, p1)
        assert float((p0 - single).abs().max()) <= 1e-10 * max(1.0, float(single.abs().max()))


def test_single_process_use_needs_no_process_group_and_refuses_misuse():
    net = IsotropicMLP((4, 3, 2), seed=0)
    with pytest.raises(IsocompressError, match="needs an initialised process group"):
        Neuroadaptation(net, None, distributed=True)
    with pytest.raises(IsocompressError, match="not its DataParallel wrapper: pass wrapper.module"):
        Neuroadaptation(DataParallel(net))
    with pytest.raises(IsocompressError, match="distributed='yes'"):
        net.grow(0, 1, distributed="yes")
    with pytest.raises(IsocompressError, match="rewrap takes a torch.nn.parallel.DistributedDataParallel"):
        rewrap(net)
    with pytest.raises(IsocompressError, match="needs an initialised process group"):
        rank_difference([torch.zeros(1)])
    code = ("import sys, torch; from isocompress.train.nn import IsotropicMLP; from isocompress.train.adapt import "
            "Neuroadaptation\nnet = IsotropicMLP((4, 3, 2), seed=0)\nschedule = Neuroadaptation(net, every=1, "
            "threshold=1.0, scaffold=1)\nschedule.step(); net.diagonalise(0)\n"
            "print('isocompress.train.distributed' in sys.modules, torch.distributed.is_initialized())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_run_local_stops_processes_that_hang():
    with pytest.raises(IsocompressError, match="did not finish within 2 s; they were stopped"):
        run_local(ddp_workers.hang, 2, timeout_s=2, collective_timeout_s=30)


def run_to_end(command, timeout_s=300):
    """(exit status, stdout, stderr) of a command in its own session; on timeout the session is killed (the command
    and the processes it spawned)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_the_script_trains_on_two_processes_and_reports_identical_ranks(tmp_path):
    code, stdout, stderr = run_to_end([sys.executable, "scripts/train_adaptive.py", "--nproc", "2", "--quick",
                                       "--out", str(tmp_path), "--quiet"])
    assert code == 0, stderr[-3000:]
    assert stdout.splitlines()[-1] == "ranks identical: max |diff| = 0"
    assert (tmp_path / "digits.pt").exists() and (tmp_path / "adaptive.json").exists()


@pytest.mark.slow
def test_two_processes_reach_one_process_accuracy_within_seed_noise():
    """benchmarks/bench_ddp.py, short: digits, 3 seeds, 1 process against 2 with the same global batch."""
    code, stdout, stderr = run_to_end([sys.executable, "benchmarks/bench_ddp.py", "--seeds", "3", "--epochs", "3",
                                       "--json"])
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    noise = 3 * result["standard_error"] + 1 / result["test_size"]  # one test sample: the resolution of accuracy
    assert abs(result["difference"]) <= noise, result
    assert result["mean_ddp"] > 0.2  # trained (chance is 0.1)
