"""One extraction job over several processes launched by torchrun, or one process without it.

    job = Job.from_env(timeout_s=1800)     # WORLD_SIZE, RANK, LOCAL_RANK from torchrun
    with job:                              # process group up (gloo for coordination)
        paths = job.step("listing", lambda: find_images(src))   # a UserError on any rank ends all
        mine = job.share(items)            # this rank's items: every world_size-th from its rank
        everything = job.gather(my_part)   # [part of rank 0, part of rank 1, ...]
        job.wait("computing")              # every rank here, or a timeout naming the missing ones

Coordination goes over a gloo process group, also on GPU machines (each rank then computes on
cuda:LOCAL_RANK): it exchanges small Python objects only, and a gloo `monitored_barrier`
can say which rank did not arrive. Without torchrun (no WORLD_SIZE, or 1) every method is the
plain one-process operation, no process group is made and torch is not imported (a
one-process re-run that finds its cache up to date never needs torch).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from cache.errors import UserError, first_line

T = TypeVar("T")


@dataclass
class Job:
    """This process's place in the job: rank r of world_size, on its node local_rank."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0   # how long a rank waits for the others at a meeting point
    _owns_group: bool = False
    _launcher: int = field(default_factory=os.getppid)   # torchrun's agent, on this node

    @classmethod
    def from_env(cls, timeout_s: float = 1800.0) -> "Job":
        """The job torchrun describes in the environment; one process when it describes none."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers: launch with "
                            "torchrun, or unset them") from None
        return cls(rank, world, local, timeout_s)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def lead(self) -> bool:
        """The rank that assembles, prints and owns the job-wide progress line."""
        return self.rank == 0

    def __enter__(self) -> "Job":
        if not self.distributed:
            return self
        import torch.distributed as dist
        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo",
                                        timeout=datetime.timedelta(seconds=self.timeout_s))
            except (RuntimeError, ValueError) as e:   # DistStoreError is a RuntimeError
                raise UserError(f"rank {self.rank}: not every one of the {self.world_size} "
                                f"ranks arrived to start the job within {self.timeout_s:g} s "
                                f"({first_line(e)}): a rank did not start or died; re-run the "
                                "same command to resume") from None
            self._owns_group = True
        return self

    def __exit__(self, *exc) -> None:
        if not self._owns_group:
            return
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def device(self, name: str) -> str:
        """--device for this rank: with several ranks, auto and cuda mean cuda:LOCAL_RANK."""
        if not self.distributed or name not in ("auto", "cuda"):
            return name
        import torch
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: positions rank, rank + world_size, ... (a fixed deal)."""
        return list(items[self.rank::self.world_size])

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def step(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank, then meet (see `wait`); if it raised on any rank, raise on
        every rank: the same UserError (naming the rank) for a user mistake, else the original
        exception where it happened and a UserError naming that rank elsewhere."""
        if not self.distributed:
            return fn()
        try:
            value, failure = fn(), None
        except KeyboardInterrupt:
            raise                # Ctrl-C: stop now, not wait for ranks that may not come
        except UserError as e:
            value, failure, own = None, ("user", first_line(e, 1000)), e
        except BaseException as e:
            value, failure, own = None, ("bug", f"{type(e).__name__}: {first_line(e)}"), e
        self.wait(what)          # names a rank that died or hangs, instead of blocking forever
        failures = [(r, f) for r, f in enumerate(self.gather(failure)) if f is not None]
        if not failures:
            return value
        if failure is not None:
            raise own            # the same message on every rank where it happened
        rank, (kind, text) = failures[0]
        if kind == "user":
            raise UserError(f"rank {rank}: {text}")
        raise UserError(f"rank {rank} failed while {what} ({text}): see its traceback; "
                        "re-run the same command to resume")

    def wait(self, what: str) -> None:
        """Meet every rank here, or fail after the timeout naming the ranks that did not come."""
        if not self.distributed:
            return
        import torch.distributed as dist
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            raise UserError(f"rank {self.rank}: not every rank arrived after {what} within "
                            f"{self.timeout_s:g} s ({first_line(e)}): a rank died or is stuck; "
                            "committed work is kept, re-run the same command to resume"
                            ) from None

    def counter(self, key: str) -> Callable[[int], int]:
        """add(n) -> the job-wide total so far of a count every rank adds to (the progress
        line's images); this rank's own total without torchrun."""
        if not self.distributed:
            total = [0]

            def add_local(n: int) -> int:
                total[0] += n
                return total[0]
            return add_local
        import torch.distributed as dist
        store = dist.distributed_c10d._get_default_store()

        def add(n: int) -> int:
            # The store lives in the launcher (this process's parent on its node): asked after
            # the launcher was killed, it fails with a DistNetworkError and a C++ stack trace
            # on stderr, so a rank that was orphaned says so without asking it.
            if os.getppid() != self._launcher:
                raise self._launcher_gone("its process ended")
            try:
                return int(store.add(key, n))
            except RuntimeError as e:    # DistNetworkError: a launcher on another node, or one
                # killed a moment ago (its sockets close before its children are orphaned)
                raise self._launcher_gone(first_line(e, 120)) from None
        return add

    def _launcher_gone(self, why: str) -> UserError:
        return UserError(f"rank {self.rank}: the torchrun launcher is gone ({why}): committed "
                         "work is kept; re-run the same torchrun command to resume")


__all__ = ["Job"]
