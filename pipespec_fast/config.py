"""Every runtime knob of the engine in one frozen object, read from the environment once.

Why one object: the knobs used to be read from ``os.environ`` in six modules, some at import and
some on every call, so a benchmark configured a run by editing the environment and a bad value
surfaced (or was ignored) far from where it was set. Here :func:`from_env` parses and validates
every variable once (a bad value is a ``ValueError`` naming the variable and what it accepts)
and code receives a :class:`RuntimeConfig`.

Two scopes (``docs/CONFIGURATION.md`` has the table):

* **process-wide** knobs choose code paths shared by every pipeline (kernel backend, the C
  library, its compiler and cache, packed weights, the fused layer stack). Code reads them from
  :func:`current`, the process configuration: ``from_env()`` on first use, then cached.
  :func:`use` replaces it for a block (tests, benchmarks). Code paths read it when they run
  (the CPU matmul route per matmul); a C library already loaded keeps its build settings.
* **per-pipeline** knobs (threads) are passed down: ``FastPipeline(..., config=cfg)`` hands its
  configuration (default: the process configuration at each generation) to the thread policy.

Only this module reads the environment (``tests/test_layout.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("auto", "triton", "reference")
SKINNY_ISAS = ("auto", "avx2", "avx512")
INT8_ISAS = ("auto", "avx512vnni", "avx2", "scalar")
CPU_LINEARS = ("skinny", "numpy", "torch")
DIST_ROWS = ("auto", "gloo", "split")  # pipespec/payload.py ROW_MODES
DEFAULT_CACHE = Path("~/.cache/pipespec-fast")

# old name -> new name: still read (when the new one is unset), with one DeprecationWarning
RENAMED = {
    "PIPESPEC_SKINNY": "PIPESPEC_C_KERNELS",  # it turned off every C kernel, not one
    "PIPESPEC_BLAS_THREADS": "PIPESPEC_CPU_THREADS",  # it sizes our own pool, not a BLAS
    "PIPESPEC_BENCH_THREADS": "PIPESPEC_TORCH_THREADS",  # the kernel benchmarks' torch threads
}


def _default_cache() -> Path:
    return DEFAULT_CACHE.expanduser()


@dataclass(frozen=True)
class RuntimeConfig:
    """The engine's runtime knobs. Each field's metadata names its environment variable.

    Process-wide: ``backend`` .. ``batch_invariant``. Per pipeline: ``cpu_threads`` ..
    ``idle_drafters`` (``None``: the thread policy decides, ``pipespec_fast.threads``).
    """

    backend: str = field(default="auto", metadata={"env": "PIPESPEC_BACKEND"})
    triton_interpret: bool = field(default=False, metadata={"env": "TRITON_INTERPRET"})
    c_kernels: bool = field(default=True, metadata={"env": "PIPESPEC_C_KERNELS"})
    skinny_isa: str = field(default="auto", metadata={"env": "PIPESPEC_SKINNY_ISA"})
    int8_isa: str = field(default="auto", metadata={"env": "PIPESPEC_INT8_ISA"})
    cc: str = field(default="gcc", metadata={"env": "PIPESPEC_CC"})
    cache_dir: Path = field(default_factory=_default_cache, metadata={"env": "PIPESPEC_CACHE"})
    packed: bool = field(default=True, metadata={"env": "PIPESPEC_PACKED"})
    fused: bool = field(default=True, metadata={"env": "PIPESPEC_FUSED"})
    cpu_linear: str = field(default="skinny", metadata={"env": "PIPESPEC_CPU_LINEAR"})
    dist_rows: str = field(default="auto", metadata={"env": "PIPESPEC_DIST_ROWS"})
    dist_peer_timeout: float = field(default=3.0,
                                     metadata={"env": "PIPESPEC_DIST_PEER_TIMEOUT"})
    graphs: bool = field(default=False, metadata={"env": "PIPESPEC_GRAPHS"})
    batch_invariant: bool = field(default=False, metadata={"env": "PIPESPEC_BATCH_INVARIANT"})
    cpu_threads: int | None = field(default=None, metadata={"env": "PIPESPEC_CPU_THREADS"})
    torch_threads: int = field(default=1, metadata={"env": "PIPESPEC_TORCH_THREADS"})
    stage_threads: tuple[int, ...] | None = field(default=None,
                                                  metadata={"env": "PIPESPEC_STAGE_THREADS"})
    idle_drafters: bool | None = field(default=None, metadata={"env": "PIPESPEC_IDLE_DRAFTERS"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, expected = _CHECKS[f.name](value)
            if not ok:
                raise ValueError(f"{f.name} ({f.metadata['env']}): expected {expected}, "
                                 f"got {value!r}")

    def process_fields(self) -> dict[str, object]:
        """The process-wide knobs and their values (what a pipeline's ``config=`` cannot
        change: they choose code paths shared by every pipeline)."""
        return {name: getattr(self, name) for name in PROCESS_FIELDS}

    def replace(self, **changes) -> RuntimeConfig:
        """A copy with some fields changed (validated like the original)."""
        return dataclasses.replace(self, **changes)


PROCESS_FIELDS = ("backend", "triton_interpret", "c_kernels", "skinny_isa", "int8_isa", "cc",
                  "cache_dir", "packed", "fused", "cpu_linear", "dist_rows",
                  "dist_peer_timeout", "graphs", "batch_invariant")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MIN_PEER_TIMEOUT_S = 1.0  # a distributed link's heartbeat comes every 0.5 s (placement.py)


def _is_seconds(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and \
        MIN_PEER_TIMEOUT_S <= v < float("inf")


def _choice(options: tuple[str, ...]) -> Callable:
    return lambda v: (v in options, f"one of {', '.join(options)}")


_CHECKS: dict[str, Callable] = {
    "backend": _choice(BACKENDS),
    "triton_interpret": lambda v: (isinstance(v, bool), "a bool"),
    "c_kernels": lambda v: (isinstance(v, bool), "a bool"),
    "skinny_isa": _choice(SKINNY_ISAS),
    "int8_isa": _choice(INT8_ISAS),
    "cc": lambda v: (isinstance(v, str) and bool(v.strip()), "a compiler command or path"),
    "cache_dir": lambda v: (isinstance(v, Path), "a pathlib.Path"),
    "packed": lambda v: (isinstance(v, bool), "a bool"),
    "fused": lambda v: (isinstance(v, bool), "a bool"),
    "cpu_linear": _choice(CPU_LINEARS),
    "dist_rows": _choice(DIST_ROWS),
    "dist_peer_timeout": lambda v: (_is_seconds(v), f"seconds >= {MIN_PEER_TIMEOUT_S:g}"),
    "graphs": lambda v: (isinstance(v, bool), "a bool"),
    "batch_invariant": lambda v: (isinstance(v, bool), "a bool"),
    "cpu_threads": lambda v: (v is None or (_is_int(v) and v >= 1), "None or an int >= 1"),
    "torch_threads": lambda v: (_is_int(v) and v >= 1, "an int >= 1"),
    "stage_threads": lambda v: (v is None or (isinstance(v, tuple) and len(v) > 0 and all(
        _is_int(x) and x >= 1 for x in v)), "None or a non-empty tuple of ints >= 1"),
    "idle_drafters": lambda v: (v is None or isinstance(v, bool), "None, True or False"),
}

# ----------------------------------------------------------------------------- parsing

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool01(name: str, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError(f"{name}={raw!r}: expected 0 or 1")
    return raw == "1"


def _triton_bool(name: str, raw: str) -> bool:
    """Triton's own flag: the spellings Triton accepts."""
    low = raw.lower()
    if low not in _TRUE + _FALSE:
        raise ValueError(f"{name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")
    return low in _TRUE


def _lower_choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"{name}={raw!r}: expected one of {', '.join(options)}")
        return value

    return parse


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected an integer >= 1")
    return value


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not _is_seconds(value):
        raise ValueError(f"{name}={raw!r}: expected seconds >= {MIN_PEER_TIMEOUT_S:g} "
                         "(e.g. 10)")
    return value


def _int_list(name: str, raw: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in raw.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{name}={raw!r}: expected comma-separated integers >= 1, one per "
                         "stage (e.g. 1,1,2)")
    return values


def _command(name: str, raw: str) -> str:
    if not raw.strip():
        raise ValueError(f"{name}={raw!r}: expected a compiler command or path")
    return raw.strip()


_PARSERS: dict[str, Callable[[str, str], object]] = {
    "backend": _lower_choice(BACKENDS),
    "triton_interpret": _triton_bool,
    "c_kernels": _bool01,
    "skinny_isa": _lower_choice(SKINNY_ISAS),
    "int8_isa": _lower_choice(INT8_ISAS),
    "cc": _command,
    "cache_dir": lambda name, raw: Path(raw).expanduser(),
    "packed": _bool01,
    "fused": _bool01,
    "cpu_linear": _lower_choice(CPU_LINEARS),
    "dist_rows": _lower_choice(DIST_ROWS),
    "dist_peer_timeout": _seconds,
    "graphs": _bool01,
    "batch_invariant": _bool01,
    "cpu_threads": _positive_int,
    "torch_threads": _positive_int,
    "stage_threads": _int_list,
    "idle_drafters": _bool01,
}

VARIABLES = {f.metadata["env"]: f.name for f in dataclasses.fields(RuntimeConfig)}
_warned: set[str] = set()


def _warn_once(key: str, message: str, category: type[Warning]) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=4)


def _lookup(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or the value of its old name (warned once); ``""`` is unset."""
    raw = env.get(name) or None
    for old, new in RENAMED.items():
        if new == name and env.get(old):
            _warn_once(old, f"{old} is deprecated: use {new}" + (
                f" ({new} is set too and wins)" if raw is not None else ""), DeprecationWarning)
            if raw is None:
                return env[old]
    return raw


def from_env(environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Parse and validate every variable of ``environ`` (default ``os.environ``).

    Unset or empty variables keep their defaults. A bad value raises ``ValueError`` naming the
    variable; an unknown ``PIPESPEC_*`` variable (a typo) is warned about once and ignored.
    """
    env = os.environ if environ is None else environ
    values = {}
    for name, fname in VARIABLES.items():
        raw = _lookup(env, name)
        if raw is not None:
            values[fname] = _PARSERS[fname](name, raw)
    for name in env:
        if name.startswith("PIPESPEC_") and name not in VARIABLES and name not in RENAMED:
            _warn_once(name, f"{name} is not a pipespec-fast setting (ignored; see "
                       "docs/CONFIGURATION.md)", RuntimeWarning)
    return RuntimeConfig(**values)


# ----------------------------------------------------------------------------- the process config

_lock = threading.Lock()
_current: RuntimeConfig | None = None


def current() -> RuntimeConfig:
    """The process configuration: :func:`from_env` on the first call, cached afterwards."""
    global _current
    cfg = _current
    if cfg is None:
        with _lock:
            if _current is None:
                _current = from_env()
            cfg = _current
    return cfg


@contextmanager
def use(cfg: RuntimeConfig) -> Iterator[RuntimeConfig]:
    """Make ``cfg`` the process configuration inside the block; the previous one comes back
    afterwards. Process-wide, not per thread: meant for tests and benchmarks, e.g.
    ``with config.use(config.current().replace(backend="triton")): ...``."""
    global _current
    if not isinstance(cfg, RuntimeConfig):
        raise TypeError(f"config.use: expected a RuntimeConfig, got {type(cfg).__name__}")
    previous = current()
    _current = cfg
    try:
        yield cfg
    finally:
        _current = previous
