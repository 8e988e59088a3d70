"""Distributed data-parallel training: `dinomix train` launched by torchrun runs one process per device.

    torchrun --standalone --nproc_per_node=N -m dinomix train CONFIG -o RUN_DIR [--events FILE] [--resume]

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (and LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) in each process;
`DistContext.from_env` reads them. Without them, or with WORLD_SIZE 1, training is the single-process trainer,
bit for bit. With N > 1 processes:

* Process group: NCCL when the device is CUDA (process k uses cuda:LOCAL_RANK), gloo on CPU (each process then
  uses `threads` or cores / LOCAL_WORLD_SIZE threads). MPS is not supported (no backend).
* Model: the network is wrapped in DistributedDataParallel (`Trainer.train_net`), which averages gradients
  over the processes in backward, so every process applies the same update and the replicas stay identical.
  Forward passes that need gradients must go through `train_net`; the semi-supervised trainer wraps only the
  student: its EMA teacher is updated identically everywhere from identical student weights. The checkpoint
  and the model files hold the plain network's state (no `module.` prefix): the same files as a 1-process run.
* Data ("DistributedSampler"): the trainer has no epoch over a dataset to partition. Each iteration draws its
  patches class-balanced from the whole training set with generators seeded by (seed, iteration); process r
  of N > 1 seeds them with (seed, iteration, r). A DistributedSampler gives each process a disjoint share of
  an epoch's samples; here each process draws its own independent class-balanced batch instead, which is the
  same thing for i.i.d. sampling and keeps class balancing over all cases (a split of the cases would leave
  rare organs to one process) and exact resume (every draw is a function of seed, iteration and rank).
  Every process caches all training cases (each needs them all to sample from); the wall time of caching
  does not change, the memory does (N copies on one machine).
* Batch size: `batch_size` (and `semi.unlabeled_batch`) are per process; one iteration trains on N times as
  many patches. The learning rate and schedule are unchanged (not scaled with N); iterations count
  optimizer steps, as in a 1-process run.
* Evaluation is split: process r evaluates eval cases r, r+N, ... and the per-case Dice values are gathered in
  case order, so the numbers are those of a 1-process evaluation.
* Output: only rank 0 writes checkpoints, model files, events and progress; the other processes' reporter is
  silent (errors still go to their stderr). The logged loss is the mean over the processes.
* Replica check: at every checkpoint and at the end, every process hashes its weights (the model file's
  `weights_sha256`) and rank 0 gathers the hashes; different hashes stop the run with an error. The hashes are
  in the checkpoint (`distributed.replica_weights_sha256`) and in the result event.
* Resume: the checkpoint records the world size; resuming needs the same number of processes (a clear error
  otherwise), and then repeats the uninterrupted run exactly (on CPU).
* Signals: SIGINT/SIGTERM to torchrun are forwarded by torchrun to every process; rank 0 writes its last
  snapshot as a resumable checkpoint and all processes exit at once (exit status 130; torchrun itself then
  exits non-zero). If a process dies, rank 0 writes the snapshot too before it stops.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from ..errors import DinomixError
from ..events import Reporter


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None
    comm_device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> DistContext:
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
            local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError:
            raise DinomixError("distributed training: WORLD_SIZE, RANK and LOCAL_RANK must be integers "
                               "(launch with torchrun)") from None
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise DinomixError(f"distributed training: RANK {rank} is outside 0..{world - 1}")
        return cls(world, rank, local, max(1, local_world))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ set-up
    def device(self, device: torch.device) -> torch.device:
        """The device of this process: cuda:LOCAL_RANK for CUDA runs."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise DinomixError(f"distributed training: LOCAL_RANK {self.local_rank} but only "
                                   f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node <= the GPU count")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            return device
        if device.type != "cpu":
            raise DinomixError(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not on {device.type}; "
                               "use --device cpu or cuda")
        return device

    def init(self, device: torch.device) -> None:
        if not self.enabled or dist.is_initialized():
            return
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")
        try:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise DinomixError(f"distributed training: cannot join the process group ({self.backend}): "
                               f"{str(exc)[:300]} (launch with torchrun)") from None

    def close(self) -> None:
        """Leave the process group while the interpreter is fully alive. Callers first drop every object that
        holds the group (the DDP wrapper's reducer does): the group's gloo threads must be joined now, not
        during interpreter finalization, where a late release aborts the process (`exit_process`)."""
        if self.enabled and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

    def exit_process(self, code: int) -> None:
        """End a torchrun worker with `code` once its outputs are written, skipping interpreter finalization.

        Finalization of a process that has run gloo collectives can abort it with "terminate called without an
        active exception" (C++ threads released while the interpreter is torn down; pytorch/pytorch#190489,
        the atexit fix in #179291 was abandoned). A worker that ends with SIGABRT after a complete run makes
        torchrun report the whole run as failed, so the worker leaves through os._exit after flushing."""
        if not self.enabled:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    # ------------------------------------------------------------------ collectives (no-ops in 1 process)
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather_cat(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor concatenated over the processes along dim 0 (rank order); same shapes on every rank."""
        if not self.enabled:
            return tensors
        out = []
        for t in tensors:
            src = t.to(self.comm_device).contiguous()
            parts = [torch.empty_like(src) for _ in range(self.world_size)]
            dist.all_gather(parts, src)
            out.append(torch.cat(parts).to(t.device))
        return tuple(out)


class Replicated(torch.nn.Module):
    """What DDP replicates when a trainer also trains other modules (components): the network, whose forward
    DDP runs, and those modules, whose parameters receive their gradients in the same backward pass (DDP then
    averages them too; each must get a gradient every iteration, as DDP requires of all its parameters)."""

    def __init__(self, net: torch.nn.Module, others: list[torch.nn.Module]) -> None:
        super().__init__()
        self.net = net
        self.others = torch.nn.ModuleList(others)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)


class SilentReporter(Reporter):
    """The reporter of ranks other than 0: no events, no bar, no log lines."""

    def __init__(self, stages: Optional[dict[str, float]] = None) -> None:
        super().__init__(events=None, bar=False, stages=stages)

    def emit(self, event: str, **fields: Any) -> None:  # noqa: ARG002
        return None

    def log(self, message: str, level: str = "info") -> None:  # noqa: ARG002
        return None
