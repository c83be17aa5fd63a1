"""Ctrl-C on ``torchrun`` ends every rank of ``pipespec_fast generate --distributed``.

A terminal's Ctrl-C reaches the launcher only (``torchrun`` starts each rank in its own
session) and ``torchrun`` forwards SIGINT to each rank. The test starts two ranks of the real
command line under ``torchrun`` (``tests/dist_cli_child.py``: the same CLI, each forward
slowed so the generation is still running), sends SIGINT to the launcher once both ranks are
mid-generation, and checks that every rank says it was interrupted and is gone within a few
seconds. Whatever happens, every process it started is killed at the end (and the test fails
if one had to be)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_distributed import _family_dirs

CHILD = Path(__file__).with_name("dist_cli_child.py")
START_TIMEOUT_S = 60  # torchrun and two ranks importing torch on a loaded 2-core machine
EXIT_WITHIN_S = 5.0


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc: a rank is a child of torchrun)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(d.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p} - found
        found |= kids
        todo.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(cond, timeout_s: float, poll_s: float = 0.05) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


# long: one scenario, start to clean-up (the finally kills whatever is left)
def test_sigint_to_torchrun_ends_every_rank_with_a_message(tmp_path):
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    dirs, _ = _family_dirs(tmp_path, 2, seed=43, words=words)
    marks = tmp_path / "marks"
    marks.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(CHILD), str(marks), "0.05", "generate", "--distributed", "--models", *dirs,
           "--prompt", "w1 w5 w7", "--max-new-tokens", "400", "--ignore-eos", "--max-len",
           "512"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
    ranks: set[int] = set()
    try:
        pids = [marks / f"rank{r}.pid" for r in range(2)]
        started = _wait_for(lambda: all(p.exists() for p in pids) or launcher.poll() is not None,
                            START_TIMEOUT_S)
        assert started and launcher.poll() is None, err_path.read_text()
        ranks = {int(p.read_text()) for p in pids}
        assert ranks <= _descendants(launcher.pid)
        sent = time.monotonic()
        launcher.send_signal(signal.SIGINT)
        gone = _wait_for(lambda: not any(_alive(p) for p in ranks), EXIT_WITHIN_S)
        took = time.monotonic() - sent
        launcher.wait(timeout=EXIT_WITHIN_S)
        assert gone, f"ranks alive {took:.1f} s after SIGINT:\n{err_path.read_text()}"
    finally:
        left = (_descendants(launcher.pid) | ranks) if launcher.poll() is None else ranks
        left = {p for p in left if _alive(p)}
        for p in left:
            os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
    assert not left, f"processes left behind: {left}"
    text = err_path.read_text()
    for r in range(2):
        # each rank says it was interrupted, or (its neighbour's SIGINT came first) fails
        # naming the interrupted neighbour
        other = f"pipespec-fast: error: StageError: stage {1 - r} (m{1 - r}) on rank {1 - r}" \
            " failed: RemoteStageError: interrupted (KeyboardInterrupt: Ctrl-C or SIGINT)"
        assert f"pipespec-fast: interrupted (rank {r} of 2)" in text or other in text, text
    assert text.count("pipespec-fast: ") == 2, text  # one line a rank
    assert not re.search(r'File ".*(pipespec_fast|dist_cli_child)', text), text  # no trace
