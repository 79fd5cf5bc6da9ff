"""Adaptive training under torch.distributed (DDP): one decision for every rank, re-wrapping DDP, comparing ranks.

A restructuring changes parameter shapes, and every rank must make the same change: an SVD computed on each rank can
differ in the signs and order of its vectors, and growth draws random outgoing weights. So the decision and its maps
(`isocompress.train.adapt.Plan`) are computed on one rank and broadcast (`RankSync.share`); every rank then applies
the same float64 maps to its own (identical) parameters and optimiser state. DDP's buckets and hooks still point at
the replaced parameters, so DDP is re-wrapped after each change (`rewrap`). docs/training.md, "Under DDP".

Nothing here runs in a single-process program: `isocompress.train.adapt` imports this module only when asked to be
distributed. The same code runs with gloo (CPU tensors) and NCCL (CUDA tensors on the current device).
"""

from __future__ import annotations

import inspect
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from isocompress.core.errors import IsocompressError

F64 = torch.float64
FAILED = -1  # the count broadcast by a source rank whose computation raised


@dataclass(frozen=True)
class RankSync:
    """Which rank decides (`src`, a global rank) for which process group (`group`; None: the default group)."""

    src: int = 0
    group: Any = None

    def device(self) -> torch.device:
        """Where this group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` from `src` on every rank (others pass a buffer of the same shape and dtype), back on the CPU."""
        moved = tensor.to(self.device()).contiguous()  # a collective sends the storage in memory order
        dist.broadcast(moved, src=self.src, group=self.group)
        return moved.cpu()

    def share(self, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """`compute()` run on `src` only; its tensors (as float64) returned on every rank, bit for bit. When it raises
        on `src`, every other rank raises too (instead of waiting for tensors that never come)."""
        if dist.get_rank() == self.src:
            try:
                tensors = [t.detach().to(dtype=F64, device="cpu") for t in compute()]
            except BaseException:
                self.broadcast(torch.tensor([FAILED], dtype=torch.int64))
                raise
            shapes = [len(tensors)] + [d for t in tensors for d in (t.dim(), *t.shape)]
            self.broadcast(torch.tensor([len(shapes)], dtype=torch.int64))
            self.broadcast(torch.tensor(shapes, dtype=torch.int64))
            return [self.broadcast(t) for t in tensors]
        size = int(self.broadcast(torch.zeros(1, dtype=torch.int64)))
        if size == FAILED:
            raise IsocompressError(f"rank {self.src} failed while deciding a restructuring (its error is in its own "
                                   "output); this rank stops too")
        return [self.broadcast(torch.empty(shape, dtype=F64)) for shape in _shapes(self.broadcast(
            torch.zeros(size, dtype=torch.int64)).tolist())]


def _shapes(encoded: list[int]) -> list[tuple[int, ...]]:
    """[count, ndim, dims..., ndim, dims...] → the shapes."""
    shapes, at = [], 1
    for _ in range(encoded[0]):
        ndim = encoded[at]
        shapes.append(tuple(encoded[at + 1: at + 1 + ndim]))
        at += 1 + ndim
    return shapes


def resolve(distributed) -> RankSync:
    """`distributed=True` → RankSync() (rank 0 of the default group decides); a RankSync as given. Refused in one line
    when torch.distributed has no initialised process group."""
    sync = RankSync() if distributed is True else distributed
    if not isinstance(sync, RankSync):
        raise IsocompressError(f"distributed={distributed!r}: use True (rank 0 of the default process group decides) "
                               "or isocompress.train.distributed.RankSync(src=..., group=...)")
    if not (dist.is_available() and dist.is_initialized()):
        raise IsocompressError("distributed restructuring needs an initialised process group: call "
                               "torch.distributed.init_process_group(...) first, or leave distributed unset")
    return sync


def rank_difference(tensors: Sequence[torch.Tensor], sync: RankSync | None = None) -> float:
    """max |t − t_src| over these tensors and every rank (the same number on every rank): 0 exactly when every
    rank holds the same values and shapes (compared in float64, which holds float32 and bfloat16 exactly; two NaNs in
    the same place count as equal); inf when the ranks hold different numbers of values. A collective: every rank
    calls it with its own tensors, in the same order."""
    sync = resolve(sync or True)
    device = sync.device()
    shapes = [float(d) for t in tensors for d in (t.dim(), *t.shape)]
    flat = torch.cat([torch.tensor(shapes, dtype=F64)] + [t.detach().reshape(-1).to(F64).cpu() for t in tensors])
    lengths = torch.tensor([flat.numel(), -flat.numel()], dtype=torch.int64, device=device)
    dist.all_reduce(lengths, op=dist.ReduceOp.MAX, group=sync.group)
    if int(lengths[0]) != -int(lengths[1]):
        return float("inf")
    reference = sync.broadcast(flat.clone())  # in place on the receiving ranks
    same = (reference == flat) | (torch.isnan(reference) & torch.isnan(flat))
    local = torch.where(same, torch.zeros_like(flat), (reference - flat).abs()).max() if flat.numel() else flat.sum()
    worst = local.reshape(1).to(device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=sync.group)
    return float(worst)


# The DistributedDataParallel settings `rewrap` carries over (where the installed torch accepts them).
CARRIED_SETTINGS = ("device_ids", "output_device", "dim", "process_group", "find_unused_parameters",
                    "gradient_as_bucket_view", "static_graph", "mixed_precision")


def rewrap(ddp, **overrides):
    """A new `DistributedDataParallel` around `ddp.module` with `ddp`'s settings (CARRIED_SETTINGS, the bucket size
    and buffer synchronisation), after a restructuring has replaced parameters: the old wrapper's buckets belong to
    the old parameters, and its gradient hooks on the parameters that were kept would still fire, so it is retired
    first (`retire`). `overrides` are passed to the constructor as well (for settings not carried, such as
    bucket_cap_mb_list). A collective, like the constructor: every rank calls it at the same step; it broadcasts
    the module's parameters and buffers from rank 0 again."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp, DistributedDataParallel):
        raise IsocompressError(f"rewrap takes a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}; "
                               "build the first wrapper yourself, then pass it here after each change")
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    settings = {name: getattr(ddp, name) for name in CARRIED_SETTINGS if name in accepted and hasattr(ddp, name)}
    if "bucket_cap_mb" in accepted and hasattr(ddp, "bucket_bytes_cap"):
        settings["bucket_cap_mb"] = ddp.bucket_bytes_cap / 2**20
    for name in ("forward_sync_buffers", "broadcast_buffers"):
        if name in accepted and hasattr(ddp, name):
            settings[name] = getattr(ddp, name)
            break
    retire(ddp)
    return DistributedDataParallel(ddp.module, **{**settings, **overrides})


def retire(ddp) -> None:
    """Detach a DistributedDataParallel wrapper from its module's parameters (remove its gradient hooks), so that a
    new wrapper can take over; the old one synchronises nothing afterwards. `rewrap` calls it; call it yourself
    when you build the new wrapper yourself (or drop every reference to the old one before the next backward)."""
    remove = getattr(getattr(ddp, "reducer", None), "_remove_autograd_hooks", None)
    if remove is not None:
        remove()
    for handle in getattr(ddp, "_accum_grad_hooks", ()):
        handle.remove()


# --- running N local processes (tests, scripts/train_adaptive.py --nproc, the docs' example) -----------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS's choice for port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def backend_for(device: str | torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise (the same code runs on either)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_local(rank: int, world_size: int, port: int, backend: str = "gloo", timeout_s: float = 300.0) -> None:
    """Join a process group of `world_size` processes on this machine (rank 0 listens on `port`); with NCCL this
    process uses CUDA device `rank`. A collective waiting longer than `timeout_s` fails instead of hanging."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _entry(rank: int, worker, world_size: int, port: int, backend: str, timeout_s: float, results: str, args) -> None:
    init_local(rank, world_size, port, backend, timeout_s)
    try:
        result = worker(rank, world_size, *args)
        dist.barrier()  # no rank tears its connections down while another still has a collective in flight
    finally:
        dist.destroy_process_group()
    staged = Path(results) / f".rank{rank}.pt"
    torch.save(result, staged)
    staged.replace(Path(results) / f"rank{rank}.pt")


def run_local(worker: Callable, nproc: int, *args, backend: str = "gloo", timeout_s: float | None = None,
              collective_timeout_s: float = 300.0) -> list:
    """`worker(rank, nproc, *args)` in `nproc` fresh (spawned) processes, each inside an initialised process group
    (`backend`); returns their results in rank order (tensors, numbers, strings and containers of them). `worker`
    must be importable (a module-level function). A process that fails stops the others and raises here; if they
    have not all finished after `timeout_s` they are killed and this raises; a collective that waits longer than
    `collective_timeout_s` fails in its process."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="isocompress-ranks-") as results:
        context = mp.start_processes(_entry, nprocs=nproc, join=False, start_method="spawn",
                                     args=(worker, nproc, free_port(), backend, collective_timeout_s, results, args))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not context.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                _kill(context.processes)
                raise IsocompressError(f"{nproc} processes did not finish within {timeout_s:g} s; they were stopped")
        return [torch.load(Path(results) / f"rank{rank}.pt", weights_only=True) for rank in range(nproc)]


def _kill(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
