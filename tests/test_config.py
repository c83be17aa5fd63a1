"""The one configuration object (``pipespec_fast.config``): every variable parsed and validated
once, from the mapping it is given; the process configuration cached and replaceable."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

from pipespec_fast import config
from pipespec_fast.config import RuntimeConfig, from_env

ROOT = Path(__file__).resolve().parents[1]

# variable, value, field, parsed value
PARSED = [
    ("PIPESPEC_BACKEND", "triton", "backend", "triton"),
    ("PIPESPEC_BACKEND", " Reference ", "backend", "reference"),
    ("TRITON_INTERPRET", "1", "triton_interpret", True),
    ("TRITON_INTERPRET", "true", "triton_interpret", True),
    ("TRITON_INTERPRET", "0", "triton_interpret", False),
    ("PIPESPEC_C_KERNELS", "0", "c_kernels", False),
    ("PIPESPEC_SKINNY_ISA", "avx2", "skinny_isa", "avx2"),
    ("PIPESPEC_SKINNY_ISA", "AVX512", "skinny_isa", "avx512"),
    ("PIPESPEC_INT8_ISA", "avx2", "int8_isa", "avx2"),
    ("PIPESPEC_INT8_ISA", " Scalar", "int8_isa", "scalar"),
    ("PIPESPEC_INT8_ISA", "AVX512VNNI", "int8_isa", "avx512vnni"),
    ("PIPESPEC_CC", "clang", "cc", "clang"),
    ("PIPESPEC_CACHE", "/srv/cache", "cache_dir", Path("/srv/cache")),
    ("PIPESPEC_CACHE", "~/c", "cache_dir", Path.home() / "c"),
    ("PIPESPEC_PACKED", "0", "packed", False),
    ("PIPESPEC_FUSED", "0", "fused", False),
    ("PIPESPEC_CPU_LINEAR", "numpy", "cpu_linear", "numpy"),
    ("PIPESPEC_CPU_LINEAR", "torch", "cpu_linear", "torch"),
    ("PIPESPEC_DIST_ROWS", "split", "dist_rows", "split"),
    ("PIPESPEC_DIST_ROWS", " GLOO", "dist_rows", "gloo"),
    ("PIPESPEC_DIST_PEER_TIMEOUT", "10", "dist_peer_timeout", 10.0),
    ("PIPESPEC_DIST_PEER_TIMEOUT", " 1.5", "dist_peer_timeout", 1.5),
    ("PIPESPEC_GRAPHS", "1", "graphs", True),
    ("PIPESPEC_GRAPHS", "0", "graphs", False),
    ("PIPESPEC_BATCH_INVARIANT", "1", "batch_invariant", True),
    ("PIPESPEC_BATCH_INVARIANT", "0", "batch_invariant", False),
    ("PIPESPEC_CPU_THREADS", "6", "cpu_threads", 6),
    ("PIPESPEC_TORCH_THREADS", "2", "torch_threads", 2),
    ("PIPESPEC_STAGE_THREADS", "1,1,2", "stage_threads", (1, 1, 2)),
    ("PIPESPEC_STAGE_THREADS", "3", "stage_threads", (3,)),
    ("PIPESPEC_IDLE_DRAFTERS", "0", "idle_drafters", False),
    ("PIPESPEC_IDLE_DRAFTERS", "1", "idle_drafters", True),
]

# variable, bad value, what the message says is expected
REJECTED = [
    ("PIPESPEC_BACKEND", "cuda", "one of auto, triton, reference"),
    ("TRITON_INTERPRET", "maybe", "1/true/yes/on or 0/false/no/off"),
    ("PIPESPEC_C_KERNELS", "no", "0 or 1"),
    ("PIPESPEC_SKINNY_ISA", "sse", "one of auto, avx2, avx512"),
    ("PIPESPEC_INT8_ISA", "avx512", "one of auto, avx512vnni, avx2, scalar"),
    ("PIPESPEC_CC", "   ", "a compiler command or path"),
    ("PIPESPEC_PACKED", "off", "0 or 1"),
    ("PIPESPEC_FUSED", "2", "0 or 1"),
    ("PIPESPEC_CPU_LINEAR", "blas", "one of skinny, numpy, torch"),
    ("PIPESPEC_DIST_ROWS", "nccl", "one of auto, gloo, split"),
    ("PIPESPEC_DIST_PEER_TIMEOUT", "0.5", "seconds >= 1"),  # under two heartbeats
    ("PIPESPEC_DIST_PEER_TIMEOUT", "3s", "seconds >= 1"),
    ("PIPESPEC_DIST_PEER_TIMEOUT", "inf", "seconds >= 1"),
    ("PIPESPEC_DIST_PEER_TIMEOUT", "nan", "seconds >= 1"),
    ("PIPESPEC_GRAPHS", "on", "0 or 1"),
    ("PIPESPEC_BATCH_INVARIANT", "true", "0 or 1"),
    ("PIPESPEC_CPU_THREADS", "0", "an integer >= 1"),
    ("PIPESPEC_CPU_THREADS", "two", "an integer >= 1"),
    ("PIPESPEC_TORCH_THREADS", "-1", "an integer >= 1"),
    ("PIPESPEC_STAGE_THREADS", "1,x,2", "comma-separated integers >= 1"),
    ("PIPESPEC_STAGE_THREADS", "1,0,1", "comma-separated integers >= 1"),
    ("PIPESPEC_STAGE_THREADS", "1,,2", "comma-separated integers >= 1"),
    ("PIPESPEC_IDLE_DRAFTERS", "yes", "0 or 1"),
]


@pytest.fixture
def warn_again(monkeypatch):
    """Forget which one-time warnings were given."""
    monkeypatch.setattr(config, "_warned", set())


def test_defaults():
    cfg = from_env({})
    assert cfg == RuntimeConfig()
    assert (cfg.backend, cfg.triton_interpret, cfg.c_kernels, cfg.skinny_isa, cfg.int8_isa,
            cfg.cc) == ("auto", False, True, "auto", "auto", "gcc")
    assert cfg.cache_dir == Path.home() / ".cache" / "pipespec-fast"
    assert (cfg.packed, cfg.fused, cfg.cpu_linear, cfg.dist_rows, cfg.graphs,
            cfg.batch_invariant) == (True, True, "skinny", "auto", False, False)
    assert cfg.dist_peer_timeout == 3.0
    assert (cfg.cpu_threads, cfg.torch_threads, cfg.stage_threads, cfg.idle_drafters) == \
        (None, 1, None, None)


def test_every_field_has_a_variable_and_every_variable_is_tested():
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert set(config.VARIABLES.values()) == fields and len(config.VARIABLES) == len(fields)
    assert {name for name, *_ in PARSED} == set(config.VARIABLES)
    assert {name for name, *_ in REJECTED} >= set(config.VARIABLES) - {"PIPESPEC_CACHE"}


@pytest.mark.parametrize("name,raw,field,value", PARSED)
def test_every_variable_is_parsed(name, raw, field, value):
    cfg = from_env({name: raw})
    assert getattr(cfg, field) == value
    assert cfg == RuntimeConfig().replace(**{field: value})  # nothing else changed


@pytest.mark.parametrize("name,raw,expected", REJECTED)
def test_bad_values_are_rejected_naming_the_variable(name, raw, expected):
    with pytest.raises(ValueError, match=f"^{name}={re.escape(repr(raw))}: expected "
                       f"{re.escape(expected)}"):
        from_env({name: raw})


def test_empty_means_unset():
    assert from_env({name: "" for name in config.VARIABLES}) == RuntimeConfig()


def test_reads_the_given_mapping_not_the_environment(monkeypatch):
    monkeypatch.setenv("PIPESPEC_BACKEND", "triton")
    monkeypatch.setenv("PIPESPEC_TORCH_THREADS", "3")
    assert from_env({}).backend == "auto" and from_env({}).torch_threads == 1
    assert from_env({"PIPESPEC_TORCH_THREADS": "2"}).torch_threads == 2
    cfg = from_env()  # None: os.environ
    assert (cfg.backend, cfg.torch_threads) == ("triton", 3)


@pytest.mark.parametrize("old,new,raw,field,value", [
    ("PIPESPEC_SKINNY", "PIPESPEC_C_KERNELS", "0", "c_kernels", False),
    ("PIPESPEC_BLAS_THREADS", "PIPESPEC_CPU_THREADS", "3", "cpu_threads", 3),
    ("PIPESPEC_BENCH_THREADS", "PIPESPEC_TORCH_THREADS", "4", "torch_threads", 4),
])
def test_old_names_still_work_with_one_deprecation_warning(warn_again, old, new, raw, field,
                                                           value):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: use {new}"):
        assert getattr(from_env({old: raw}), field) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert getattr(from_env({old: raw}), field) == value
    assert config.RENAMED[old] == new


def test_the_new_name_wins_over_the_old(warn_again):
    with pytest.warns(DeprecationWarning, match="PIPESPEC_CPU_THREADS is set too and wins"):
        cfg = from_env({"PIPESPEC_BLAS_THREADS": "3", "PIPESPEC_CPU_THREADS": "5"})
    assert cfg.cpu_threads == 5
    with pytest.raises(ValueError, match="^PIPESPEC_C_KERNELS='x'"):  # validated under its name
        with pytest.warns(DeprecationWarning):
            from_env({"PIPESPEC_SKINNY": "x"})


def test_unknown_pipespec_variable_is_warned_about_once(warn_again):
    with pytest.warns(RuntimeWarning, match="PIPESPEC_FUSSED is not a pipespec-fast setting"):
        assert from_env({"PIPESPEC_FUSSED": "0"}) == RuntimeConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_env({"PIPESPEC_FUSSED": "0", "OTHER_TOOL_SETTING": "1"})


@pytest.mark.parametrize("field,value,expected", [
    ("backend", "cuda", "one of auto, triton, reference"),
    ("c_kernels", 0, "a bool"),
    ("cache_dir", "/tmp/x", "a pathlib.Path"),
    ("dist_rows", "nccl", "one of auto, gloo, split"),
    ("dist_peer_timeout", True, "seconds >= 1"),
    ("dist_peer_timeout", 0.9, "seconds >= 1"),
    ("cpu_threads", 0, "None or an int >= 1"),
    ("torch_threads", True, "an int >= 1"),
    ("stage_threads", [1, 2], "None or a non-empty tuple of ints >= 1"),
    ("stage_threads", (1, 0), "None or a non-empty tuple of ints >= 1"),
    ("stage_threads", (), "None or a non-empty tuple of ints >= 1"),
    ("idle_drafters", 1, "None, True or False"),
])
def test_constructed_configs_are_validated_too(field, value, expected):
    env = {f: name for name, f in config.VARIABLES.items()}[field]
    with pytest.raises(ValueError, match=rf"^{field} \({env}\): expected {re.escape(expected)}"):
        RuntimeConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field} \({env}\)"):
        RuntimeConfig().replace(**{field: value})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RuntimeConfig().backend = "triton"


def test_process_config_is_read_once_and_replaceable(monkeypatch):
    monkeypatch.setattr(config, "_current", None)
    monkeypatch.setenv("PIPESPEC_TORCH_THREADS", "2")
    first = config.current()
    assert first.torch_threads == 2
    monkeypatch.setenv("PIPESPEC_TORCH_THREADS", "3")  # read once: no effect now
    assert config.current() is first
    other = first.replace(backend="reference", torch_threads=4)
    with config.use(other) as used:
        assert used is other and config.current() is other
        with config.use(RuntimeConfig()):
            assert config.current() == RuntimeConfig()
        assert config.current() is other
    assert config.current() is first
    with pytest.raises(TypeError, match="RuntimeConfig"):
        with config.use({"backend": "triton"}):
            pass
    assert config.current() is first


def test_configuration_doc_lists_every_variable():
    doc = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| `([a-z0-9_]+)` \|", doc, re.M))  # variable -> field
    assert table == config.VARIABLES
    for old, new in config.RENAMED.items():
        assert f"`{old}`" in doc and f"`{new}`" in doc


def test_import_never_fails_on_a_setting_and_the_first_use_names_it(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PIPESPEC_CPU_THREADS="abc")
    code = ("import pipespec_fast\n"
            "from pipespec_fast import config\n"
            "try:\n    config.current()\nexcept ValueError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PIPESPEC_CPU_THREADS='abc'" in proc.stdout
