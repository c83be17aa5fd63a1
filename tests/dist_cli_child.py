"""One rank of ``pipespec_fast generate --distributed`` under ``torchrun``, slowed down so a
test can interrupt it mid-generation (``tests/test_distributed_interrupt.py``):
``torchrun ... dist_cli_child.py MARKER_DIR STEP_S CLI_ARGS...``.

Every model forward sleeps ``STEP_S`` first; after the rank's fifth forward (the generation
is running) it writes ``MARKER_DIR/rank{RANK}.pid`` holding its process id. Then the real
command line runs (``pipespec_fast.cli.main``), exit code and messages included."""

import os
import sys
import time
from pathlib import Path

from pipespec_fast.cli import main
from pipespec_fast.stages import LlamaStage

MARK_AFTER = 5


def _slow_forwards(marker_dir: Path, step_s: float) -> None:
    inner, count = LlamaStage.forward, [0]

    def forward(self, *a, **kw):
        time.sleep(step_s)
        count[0] += 1
        if count[0] == MARK_AFTER:
            path = marker_dir / f"rank{os.environ['RANK']}.pid"
            path.with_suffix(".tmp").write_text(str(os.getpid()))
            path.with_suffix(".tmp").rename(path)
        return inner(self, *a, **kw)

    LlamaStage.forward = forward


if __name__ == "__main__":
    _slow_forwards(Path(sys.argv[1]), float(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
