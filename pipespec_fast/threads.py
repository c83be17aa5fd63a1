"""CPU thread policy for one generation: how many matmul threads each stage gets, which
drafters run at idle priority, from the cores that other processes leave free."""

from __future__ import annotations

import sys

import torch

from pipespec_fast.stages import Stage, is_model_free


def _own_running() -> int:
    """This process's threads that are running or runnable (``/proc/self/task``)."""
    import os

    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:  # the thread ended meanwhile
            pass
    return n


def _runnable_elsewhere() -> int | None:
    """Threads of other processes that are running or ready to run right now: the kernel's
    count of runnable threads (``/proc/loadavg``) minus this process's own, read just before
    and just after (the larger count: our matmul threads going to sleep in between must not
    look like someone else's). ``None`` where ``/proc`` does not tell."""
    try:
        before = _own_running()
        with open("/proc/loadavg") as f:
            total = int(f.read().split()[3].split("/")[0])
        ours = max(before, _own_running())
    except (OSError, ValueError, IndexError):
        return None
    return max(0, total - ours)


def _cores() -> int:
    """Cores this process may run on (its affinity mask where the OS tells, else all)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


FREE_CORES_TTL_S = 1.0  # reuse a count this long (sampling takes ~8 ms)
_free_cores_cache: tuple[float, int] | None = None


def _free_cores() -> int:
    """Cores not busy with other processes' work now: spinning matmul threads on a loaded
    machine are several times slower than one thread (measured 98 ms vs 28 ms a model pass).

    Five samples of the instantaneous runnable count 2 ms apart, the smallest kept (a load
    average would also count this process's own recent work and halve its threads after a busy
    minute); reused for :data:`FREE_CORES_TTL_S`. ``PIPESPEC_BLAS_THREADS`` overrides it."""
    import os
    import time

    global _free_cores_cache
    cores = _cores()
    env = os.environ.get("PIPESPEC_BLAS_THREADS")
    if env:
        return max(1, int(env))
    now = time.monotonic()
    if _free_cores_cache is not None and now - _free_cores_cache[0] < FREE_CORES_TTL_S:
        return _free_cores_cache[1]
    samples = []
    for i in range(5):
        if i:
            time.sleep(0.002)
        busy = _runnable_elsewhere()
        if busy is None:
            return cores
        samples.append(busy)
    free = max(1, cores - min(samples))
    _free_cores_cache = (now, free)
    return free


SWITCH_INTERVAL_S = 0.0002  # interpreter lock hand-over while drafters run at idle priority


class CpuThreads:
    """Thread policy for one generation on CPU, restored afterwards.

    Matmuls and the fused layer stack run in our C kernels (``linear.py``, ``cpu_decoder.py``)
    on the threads of their own pool (``csrc/thread_pool.c``); torch's own ops are tiny, and
    its OpenMP workers spinning beside ours cost far more than they give (measured: one model
    pass 9 ms vs 700 ms), so torch runs on the calling thread. AR and synchronous decoding use
    one matmul thread per free core.

    PipeSpec runs the model stages at once, so they share the cores:

    * more free cores than model stages: the drafters take one core each, the target the rest;
    * otherwise (e.g. 2 cores, nothing else running): the target keeps every core and the
      drafters run at idle priority (``SCHED_IDLE``), one thread each, on the cycles the target
      leaves (its Python and single-threaded work, waits). Measured on 2 cores: verification at
      the target's full speed is worth more than a drafter with a core of its own (which
      halves the target's). On a machine that other processes load, the first rule applies to
      the free cores.

    ``PIPESPEC_STAGE_THREADS="1,1,2"`` (per stage) and ``PIPESPEC_IDLE_DRAFTERS=0|1`` override
    the split; ``PIPESPEC_TORCH_THREADS`` / ``PIPESPEC_BLAS_THREADS`` the totals.
    """

    def __init__(self, stages: list[Stage], mode: str) -> None:
        import os

        from pipespec_fast.cpu.linear import blas_threads, uses_numpy

        self.active = uses_numpy() and all(st.device.type == "cpu" for st in stages)
        heavy = [i for i, st in enumerate(stages) if not is_model_free(st)]
        concurrent = mode == "pipespec" and len(heavy) > 1
        cores = _free_cores()
        self.n = 1 if concurrent else cores
        self.blas = blas_threads(self.n) if self.active else blas_threads(None)
        # per PipeSpec worker: matmul threads (None: self.n) and idle priority
        self.stage_threads: list[int | None] = [None] * len(stages)
        self.idle_stages: list[bool] = [False] * len(stages)
        if not (self.active and concurrent):
            self.torch_threads = int(os.environ.get("PIPESPEC_TORCH_THREADS", "1"))
            self.saved = torch.get_num_threads()
            return
        # idle-priority drafters only on an otherwise idle machine: beside another busy process
        # SCHED_IDLE would get almost no CPU, and the target would wait for its drafts
        share = cores > len(heavy) or cores < _cores()
        for i in heavy[:-1]:
            self.stage_threads[i] = 1
            self.idle_stages[i] = not share
        self.stage_threads[heavy[-1]] = cores - (len(heavy) - 1) if share else cores
        env = os.environ.get("PIPESPEC_STAGE_THREADS")
        if env:
            try:
                given = [int(x) for x in env.split(",")]
            except ValueError:
                given = []
            if len(given) != len(stages) or min(given) < 1:
                raise ValueError(f"PIPESPEC_STAGE_THREADS={env!r}: expected {len(stages)} "
                                 "comma-separated integers >= 1, one per stage")
            self.stage_threads = list(given)
        idle = os.environ.get("PIPESPEC_IDLE_DRAFTERS")
        if idle is not None:
            if idle not in ("0", "1"):
                raise ValueError(f"PIPESPEC_IDLE_DRAFTERS={idle!r}: expected 0 or 1")
            self.idle_stages = [idle == "1" and i in heavy[:-1] for i in range(len(stages))]
        self.torch_threads = int(os.environ.get("PIPESPEC_TORCH_THREADS", "1"))
        self.saved = torch.get_num_threads()

    def __enter__(self):
        from pipespec_fast.cpu.linear import set_threads

        if self.active:
            torch.set_num_threads(self.torch_threads)
            self.saved_linear = set_threads(self.n)
        self.saved_switch = None
        if any(self.idle_stages):
            # a drafter at idle priority holding the interpreter lock must hand it over fast
            # (the default 5 ms is a target step); restored afterwards
            self.saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.blas.__enter__()
        return self

    def __exit__(self, *exc):
        from pipespec_fast.cpu.linear import set_threads

        self.blas.__exit__(*exc)
        if self.saved_switch is not None:
            sys.setswitchinterval(self.saved_switch)
        if self.active:
            torch.set_num_threads(self.saved)
            set_threads(self.saved_linear)
