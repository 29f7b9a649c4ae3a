"""A torchrun worker that SIGKILLs itself once, for tests/test_elastic.py.

``STREAM_PML_TEST_KILL=<marker>:<rank>:<epoch>:<batch>``: the worker of that rank kills
itself at the start of that batch's step unless ``<marker>`` exists (it creates it first),
so the group torchrun restarts runs to the end. Without the variable: a plain worker.
"""

import os
import signal
import sys
from pathlib import Path

# Run as a script by torchrun: the checkout (for ``tests``) comes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _install(spec: str) -> None:
    marker, rank, epoch, batch = spec.rsplit(":", 3)
    if int(os.environ["RANK"]) != int(rank) or Path(marker).exists():
        return
    from stream_pml.trainer import Trainer

    real = Trainer.train_step

    def train_step(self, b, e):
        if e == int(epoch) and self.batch_in_epoch == int(batch):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, b, e)

    Trainer.train_step = train_step


if __name__ == "__main__":
    if os.environ.get("STREAM_PML_TEST_KILL"):
        _install(os.environ["STREAM_PML_TEST_KILL"])
    from stream_pml.train import main

    sys.exit(main(sys.argv[1:]))
