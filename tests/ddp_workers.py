"""Workers for tests/test_ddp.py, run in spawned processes by `isocompress.train.distributed.run_local` (a worker must
be importable, so they live here rather than in the test module). Each returns plain tensors and numbers; the test
compares the ranks' results in the parent process, independently of the code under test."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel

from isocompress.core.errors import IsocompressError
from isocompress.train import adapt
from isocompress.train.distributed import rank_difference, rewrap
from isocompress.train.nn import IsotropicMLP

F64 = torch.float64
WIDTHS = (6, 5, 5, 4)


def model_and_optimiser():
    """A float64 network with nonzero psi, o and biases, and Adam (weight decay on): the same on every rank."""
    torch.set_num_threads(1)
    net = IsotropicMLP(WIDTHS, psi=True, intrinsic_length="trainable", o_init=0.4, seed=0, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)
    return net, torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)


def local_batch(step: int, rank: int, n: int = 8):
    """Different data on every rank (so only DDP's averaging keeps the ranks equal)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, WIDTHS[0], generator=gen, dtype=F64), torch.randn(n, WIDTHS[-1], generator=gen, dtype=F64)


def train_step(model, optimiser, x, y) -> None:
    loss = (model(x) - y).square().mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


def snapshot(net, optimiser) -> dict:
    """Every parameter and every optimiser state value (tensors, and Adam's step), in parameter order."""
    params = list(net.parameters())
    return {"widths": list(net.widths), "params": [p.detach().clone() for p in params],
            "state": [{k: v.clone() for k, v in optimiser.state[p].items()} for p in params]}


def grads(net) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in net.parameters()]


@contextmanager
def different_svd_off_rank_0(rank: int):
    """On ranks ≠ 0, SVD-based bases come out as another machine might compute them: the singular vectors of
    `diagonalise` with other signs, and the strongest directions of `degenerate` slightly mixed (a rotation of 1e-6
    between neighbouring directions, which moves the kept span). Only a broadcast basis keeps the ranks identical."""
    if rank == 0:
        yield
        return
    svd, strengths = adapt.svd64, adapt.strengths

    def flipped_svd(a, full=False):
        u, s, vh = svd(a, full=full)
        u, vh = u.clone(), vh.clone()
        u[:, 0], vh[0] = -u[:, 0], -vh[0]
        return u, s, vh

    def mixed_strengths(net, layer, measure="directions"):
        u, s = strengths(net, layer, measure)
        skew = torch.diag(torch.ones(u.shape[1] - 1, dtype=F64), 1) * 1e-6
        return -u @ torch.linalg.matrix_exp(skew - skew.T), s

    adapt.svd64, adapt.strengths = flipped_svd, mixed_strengths
    try:
        yield
    finally:
        adapt.svd64, adapt.strengths = svd, strengths


def restructuring(rank: int, world: int) -> dict:
    """Train under DDP; grow, diagonalise and degenerate (each also without `distributed`, on a copy, as a control);
    train on through a stale and a re-wrapped DDP; run the schedule; end with a final degeneration."""
    net, opt = model_and_optimiser()
    ddp = DistributedDataParallel(net, bucket_cap_mb=1, find_unused_parameters=False)
    for step in range(4):
        train_step(ddp, opt, *local_batch(step, rank))
    out = {"before": snapshot(net, opt)}
    rank_generator = torch.Generator().manual_seed(rank)  # growth draws differ per rank unless broadcast
    control_net, control_opt = copy.deepcopy((net, opt))
    control_net.grow(0, 2, control_opt, scale=0.1, generator=torch.Generator().manual_seed(rank))
    net.grow(0, 2, opt, scale=0.1, generator=rank_generator, distributed=True)
    out["after_grow"], out["control_grow"] = snapshot(net, opt), snapshot(control_net, control_opt)
    out |= stale_then_rewrapped_step(rank, net, opt, ddp)
    ddp = out.pop("ddp")
    with different_svd_off_rank_0(rank):
        out |= svd_changes(net, opt)
        out["failure"] = failure_message()
        ddp = rewrap(ddp)
        out |= schedule(rank, net, opt, ddp)
    out["settings"] = [float(ddp.bucket_bytes_cap), float(ddp.find_unused_parameters)]
    return out


def stale_then_rewrapped_step(rank: int, net, opt, ddp) -> dict:
    """One backward through the wrapper built before the change (its hooks are on the replaced parameters), then one
    training step through a re-wrapped one, with each rank's own gradient recorded from a plain copy."""
    x, y = local_batch(100, rank)
    (ddp(x) - y).square().mean().backward()
    out = {"stale_grads": grads(net)}
    opt.zero_grad()
    ddp = rewrap(ddp)
    x, y = local_batch(101, rank)
    local = copy.deepcopy(net)
    (local(x) - y).square().mean().backward()
    out["local_grads"] = grads(local)
    train_step(ddp, opt, x, y)
    out["rewrapped_grads"] = grads(net)
    out["after_rewrapped_step"] = snapshot(net, opt)
    return out | {"ddp": ddp}


def svd_changes(net, opt) -> dict:
    """diagonalise and degenerate with `distributed` and, on a copy, without it."""
    out = {}
    for name, change in (("diagonalise", lambda n, o, d: n.diagonalise(1, o, full=True, distributed=d)),
                         ("degenerate", lambda n, o, d: n.degenerate(1, 2, o, distributed=d))):
        control_net, control_opt = copy.deepcopy((net, opt))
        change(control_net, control_opt, None)
        change(net, opt, True)
        out[f"after_{name}"], out[f"control_{name}"] = snapshot(net, opt), snapshot(control_net, control_opt)
    return out


def failure_message() -> str:
    """A decision that raises on rank 0: every rank must raise (rank 0 its own error), none may wait forever."""
    try:
        adapt.decide(lambda: [1 / 0], distributed=True)
    except ZeroDivisionError as exc:
        return f"ZeroDivisionError: {exc}"
    except IsocompressError as exc:
        return str(exc)
    return "no error"


def schedule(rank: int, net, opt, ddp) -> dict:
    """The schedule (seeded per rank, so only broadcast growth agrees), re-wrapping after each change; then the end
    of training's degeneration without re-wrapping (DDP's construction would copy rank 0's parameters again)."""
    adaptation = adapt.Neuroadaptation(net, opt, every=3, threshold=0.6, scaffold=2, max_width=9, seed=rank,
                                       log=lambda message: None, distributed=True)
    for step in range(12):
        train_step(ddp, opt, *local_batch(200 + step, rank))
        if adaptation.step():
            ddp = rewrap(ddp)
    final = net.neuroadapt(0.6, 0, opt, distributed=True)
    state = [v for p in net.parameters() for v in opt.state[p].values()]
    return {"history": [[c.kind, c.hidden, c.count, c.width_before, c.width_after, c.strength, c.step]
                        for c in adaptation.history + final],
            "final": snapshot(net, opt), "rank_difference": rank_difference(list(net.parameters())),
            "state_difference": rank_difference(state)}


def global_batch(rank: int, world: int, steps: int = 30) -> dict:
    """The same global batches of 16 split over `world` ranks (rows rank::world; the loss scaled so that DDP's
    average is the global mean), with the schedule. world = 1 runs without torch.distributed."""
    net, opt = model_and_optimiser()
    model = net if world == 1 else DistributedDataParallel(net)
    adaptation = adapt.Neuroadaptation(net, opt, every=5, threshold=1.0, scaffold=2, max_width=8,
                                       log=lambda message: None, distributed=world > 1)
    for step in range(steps):
        x, y = local_batch(step, rank=0, n=16)
        xs, ys = x[rank::world], y[rank::world]
        loss = (model(xs) - ys).square().sum() * (world / (x.shape[0] * y.shape[1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if adaptation.step() and world > 1:
            model = rewrap(model)
    return {"params": [p.detach().clone() for p in net.parameters()],
            "history": [[c.kind, c.hidden, c.count, c.step] for c in adaptation.history]}


def hang(rank: int, world: int) -> None:
    """Never finishes (for the deadline of run_local)."""
    time.sleep(600)


def scenarios(rank: int, world: int) -> dict:
    """Both scenarios in one pair of processes (starting processes is what takes time)."""
    return {"restructuring": restructuring(rank, world), "global_batch": global_batch(rank, world)}
