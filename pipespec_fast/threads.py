"""CPU thread policy for one generation: how many matmul threads each stage gets and which
drafters run at idle priority, from the cores that other processes leave free.

Two parts: :func:`plan_threads`, a pure function from the pipeline's shape, the core counts and
the configuration to a :class:`ThreadPlan` (unit-tested in ``tests/test_threads.py``), and
:class:`CpuThreads`, which measures the free cores, applies the plan for one generation and
restores the previous settings.

The policy. Matmuls and the fused layer stack run in our C kernels (``cpu/linear.py``,
``cpu/decoder.py``) on the threads of their own pool (``cpu/csrc/thread_pool.c``); torch's own
ops are tiny, and its OpenMP workers spinning beside ours cost far more than they give
(measured: one model pass 9 ms vs 700 ms), so torch runs on the calling thread. When one model
stage computes at a time (AR, sync, or PipeSpec with an n-gram drafter) it gets one matmul
thread per free core. PipeSpec runs the model stages at once, so they share the cores:

* more free cores than model stages: the drafters take one core each, the target the rest;
* otherwise (e.g. 2 cores, nothing else running): the target keeps every core and the drafters
  run at idle priority (``SCHED_IDLE``), one thread each, on the cycles the target leaves (its
  Python and single-threaded work, waits). Measured on 2 cores: verification at the target's
  full speed is worth more than a drafter with a core of its own (which halves the
  target's). On a machine that other processes load, the first rule applies to the free cores
  (beside a busy process ``SCHED_IDLE`` would get almost no CPU, and the target would wait).

``RuntimeConfig`` overrides: ``cpu_threads`` (the free-core count), ``stage_threads`` (per
stage), ``idle_drafters``, ``torch_threads``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipespec_fast import config as runtime_config
from pipespec_fast.config import RuntimeConfig
from pipespec_fast.stages import Stage, is_model_free

SWITCH_INTERVAL_S = 0.0002  # interpreter lock hand-over while drafters run at idle priority
FREE_CORES_TTL_S = 1.0  # reuse a count this long (sampling takes ~8 ms)


@dataclass(frozen=True)
class ThreadPlan:
    """The threads of one generation.

    ``active``: our CPU kernels run the matmuls (every stage on CPU, ``cpu_linear`` not
    ``torch``); when ``False`` nothing is changed. ``matmul_threads``: threads of a matmul
    called from the generating thread (AR and sync run there), and numpy BLAS's limit.
    ``stage_threads[i]`` / ``idle_stages[i]``: PipeSpec worker ``i``'s matmul threads (``None``:
    ``matmul_threads``) and whether it runs at idle priority. ``torch_threads``: torch's
    intra-op threads during the generation."""

    active: bool
    matmul_threads: int
    stage_threads: tuple[int | None, ...]
    idle_stages: tuple[bool, ...]
    torch_threads: int


def plan_threads(model_free: Sequence[bool], mode: str, free_cores: int, total_cores: int,
                 cfg: RuntimeConfig, active: bool = True) -> ThreadPlan:
    """The plan for stages with these ``model_free`` flags (smallest first, target last; the
    stages the ``mode`` runs: AR passes the target alone), ``free_cores`` of ``total_cores``
    not busy with other processes' work (``cfg.cpu_threads`` replaces the count), and
    ``active`` as in :class:`ThreadPlan`. ``ValueError`` (naming ``PIPESPEC_STAGE_THREADS``)
    if ``cfg.stage_threads`` does not give one entry per stage."""
    k = len(model_free)
    cores = max(1, cfg.cpu_threads if cfg.cpu_threads is not None else free_cores)
    heavy = [i for i, free in enumerate(model_free) if not free]
    concurrent = mode == "pipespec" and len(heavy) > 1
    if not (active and concurrent):
        return ThreadPlan(active, 1 if concurrent else cores, (None,) * k, (False,) * k,
                          cfg.torch_threads)
    share = cores > len(heavy) or cores < total_cores
    threads: list[int | None] = [None] * k
    idle = [False] * k
    for i in heavy[:-1]:
        threads[i], idle[i] = 1, not share
    threads[heavy[-1]] = max(1, cores - (len(heavy) - 1)) if share else cores
    if cfg.stage_threads is not None:
        if len(cfg.stage_threads) != k:
            raise ValueError(f"PIPESPEC_STAGE_THREADS (stage_threads) "
                             f"{','.join(map(str, cfg.stage_threads))}: expected {k} "
                             "comma-separated integers >= 1, one per stage")
        threads = list(cfg.stage_threads)
    if cfg.idle_drafters is not None:
        idle = [cfg.idle_drafters and i in heavy[:-1] for i in range(k)]
    return ThreadPlan(True, 1, tuple(threads), tuple(idle), cfg.torch_threads)


class CpuThreads:
    """Context manager: applies :func:`plan_threads`' plan for one generation on CPU (torch and
    matmul threads, numpy BLAS's limit, the interpreter's switch interval) and restores the
    previous settings on exit. ``cfg`` defaults to the process configuration.
    ``stage_threads`` / ``idle_stages`` are the plan's, for the PipeSpec workers."""

    def __init__(self, stages: Sequence[Stage], mode: str,
                 cfg: RuntimeConfig | None = None) -> None:
        from pipespec_fast.cpu.linear import own_cpu_matmuls

        cfg = cfg if cfg is not None else runtime_config.current()
        active = own_cpu_matmuls() and all(st.device.type == "cpu" for st in stages)
        free = cfg.cpu_threads if cfg.cpu_threads is not None else _free_cores()
        self.plan = plan_threads([is_model_free(st) for st in stages], mode, free, _cores(),
                                 cfg, active)
        self.stage_threads = self.plan.stage_threads
        self.idle_stages = self.plan.idle_stages

    def __enter__(self) -> CpuThreads:
        from pipespec_fast.cpu.linear import blas_threads, set_threads

        plan = self.plan
        self._saved_torch = torch.get_num_threads()
        if plan.active:
            torch.set_num_threads(plan.torch_threads)
            self._saved_matmul = set_threads(plan.matmul_threads)
        self._saved_switch = None
        if any(plan.idle_stages):
            # a drafter at idle priority holding the interpreter lock must hand it over fast
            # (the default 5 ms is a target step); restored afterwards
            self._saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._numpy_blas = blas_threads(plan.matmul_threads if plan.active else None)
        self._numpy_blas.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from pipespec_fast.cpu.linear import set_threads

        self._numpy_blas.__exit__(*exc)
        if self._saved_switch is not None:
            sys.setswitchinterval(self._saved_switch)
        if self.plan.active:
            torch.set_num_threads(self._saved_torch)
            set_threads(self._saved_matmul)


# ----------------------------------------------------------------------------- core counts

# The default hierarchy's model draft is left out on a CPU-only machine with fewer usable cores:
# on 2 cores it runs at idle priority on the cycles the target leaves, and [n-gram -> target]
# was level with or ahead of [n-gram -> draft -> target] in 18 of 20 same-run rows
# (docs/BENCHMARKS.md, "Which hierarchy by default on 2 cores"). From 3 cores plan_threads
# gives the draft a core of its own, but the target then keeps only 2 of the 3; from 4 it
# keeps 3 (neither measured: no such machine here).
DRAFT_MIN_CORES = 4


def default_draft_fits(device, cfg: RuntimeConfig | None = None) -> bool:
    """Whether ``FastPipeline.from_default()`` includes its model draft by the machine: on a
    GPU, or on CPU when the process may use :data:`DRAFT_MIN_CORES` cores (``cfg.cpu_threads``,
    the ``PIPESPEC_CPU_THREADS`` count, where set; else its affinity mask: a CPU quota of a
    container is not seen, set ``PIPESPEC_CPU_THREADS`` there)."""
    try:
        if torch.device(device).type != "cpu":
            return True
    except (RuntimeError, TypeError):  # not a device: from_pretrained names the argument
        return True
    cfg = cfg if cfg is not None else runtime_config.current()
    cores = cfg.cpu_threads if cfg.cpu_threads is not None else _cores()
    return cores >= DRAFT_MIN_CORES


def _cores() -> int:
    """Cores this process may run on (its affinity mask where the OS tells, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_running() -> int:
    """This process's threads that are running or runnable (``/proc/self/task``)."""
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


_free_cores_cache: tuple[float, int] | None = None


def _free_cores() -> int:
    """Cores not busy with other processes' work now: spinning matmul threads on a loaded
    machine are several times slower than one thread (measured 98 ms vs 28 ms a model pass).

    Five samples of the instantaneous runnable count 2 ms apart, the smallest kept (a load
    average would also count this process's own recent work and halve its threads after a busy
    minute); reused for :data:`FREE_CORES_TTL_S`."""
    global _free_cores_cache
    cores = _cores()
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
