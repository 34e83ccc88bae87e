"""Entry point for the torchrun tests: `pipeline extract` with one rank misbehaving on purpose.

    torchrun --standalone --nproc-per-node 2 tests/_dist_run.py MODE SOURCE OUTPUT [OPTIONS]

MODE: ok (plain `pipeline extract`), kill (rank 1 SIGKILLs itself at its second batch),
user-error (rank 1 alone finds a user mistake), late (rank 1 hangs past the timeout), slow
(every rank pauses at each batch).
"""
from __future__ import annotations

import os
import signal
import sys
import time

from cache.errors import UserError
from cli.main import main
from tests.conftest import FailOnBatch, failing_build



def _patch(mode: str, rank: int) -> None:
    import importlib
    module = importlib.import_module("pipeline.extract")
    if mode == "kill" and rank == 1:
        def kill() -> None:
            time.sleep(1.0)           # let the first batch's commit land
            os.kill(os.getpid(), signal.SIGKILL)
        module.build_model = failing_build(module, action=kill)
    elif mode == "user-error" and rank == 1:
        def refuse(*args, **kwargs):
            raise UserError("cannot write to /nowhere: choose another -o")
        module.check_output = refuse
    elif mode == "slow":                 # every batch takes a moment: time to kill the launcher
        build = module._build

        class Slow(FailOnBatch):
            def __call__(self, x):
                time.sleep(0.5)
                return self.inner(x)
        module._build = lambda config: (lambda m, i: (Slow(m), i))(*build(config))
    elif mode == "late" and rank == 1:   # hangs while listing the images
        find_images = module.find_images

        def slow(*args, **kwargs):
            time.sleep(8)
            return find_images(*args, **kwargs)
        module.find_images = slow


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    _patch(mode, int(os.environ.get("RANK", "0")))
    main(["extract", *args], prog_name="pipeline")
