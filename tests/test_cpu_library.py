"""The C library's one builder and loader (``pipespec_fast.cpu.library``): the build cache,
what it refuses to load (a library is code: its constructors run when it is loaded), and the
fallbacks when the library is unavailable."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import warnings

import pytest
import torch

from pipespec_fast.cpu import decoder, gemm, library

needs_build = pytest.mark.skipif(
    not (library.cpu_has_avx2_fma() and library.compiler()),
    reason="building the C library needs gcc and an x86-64 Linux CPU with avx2/fma")


@pytest.fixture
def fresh(monkeypatch, configure, tmp_path):
    """An unloaded library state with a private build cache (``tmp_path/build``)."""
    monkeypatch.setattr(library, "_lib", None)
    monkeypatch.setattr(library, "_path", None)
    monkeypatch.setattr(library, "_error", None)
    monkeypatch.setattr(library, "_warned", set())
    configure(cache_dir=tmp_path, c_kernels=True)
    return tmp_path / "build"


# the real compiler, read before any test configures another
GCC = library.compiler()


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    """One real compile of the library, as the builder runs it (its own test is
    test_builds_into_the_cache_once_with_its_checksum)."""
    assert GCC, "needs_build guards every test that uses this"
    out = tmp_path_factory.mktemp("built-once") / "library.so"
    res = subprocess.run([GCC, *library.CFLAGS, "-o", str(out), *map(str, library.SOURCES)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture
def copying_cc(fresh, built_once, configure):
    """The configured compiler answers ``--version`` as gcc does and "compiles" by copying
    :func:`built_once`'s file to its ``-o`` argument, plus a few bytes that make each build
    unique (a rebuild must record its own checksum): the loader's checks, checksums, renames
    and loading run as they always do, without a ~15 s compile in every test. Every call's
    command line must be the builder's real one, and the test must have built."""
    cc, log = fresh.parent / "copying-cc", fresh.parent / "copying-cc.log"
    q = shlex.quote
    cc.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && exec {q(GCC)} --version\n'
        f'printf "%s\\n" "$@" --- >> {q(str(log))}\n'
        'out=; prev=; for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done\n'
        '[ -n "$out" ] || { echo "copying-cc: no -o in: $*" >&2; exit 1; }\n'
        f'cp -- {q(str(built_once))} "$out" && date +%s%N >> "$out"\n')
    cc.chmod(0o755)
    configure(cc=str(cc))
    yield fresh
    calls = log.read_text().split("---\n")[:-1] if log.exists() else []
    assert calls, "the test never built the library"
    want = [*library.CFLAGS, "-o", "OUT", *map(str, library.SOURCES)]
    for call in calls:
        args = call.splitlines()
        args[args.index("-o") + 1] = "OUT"
        assert args == want


def reload(monkeypatch):
    """Forget the loaded library (as a new process would) and load again."""
    monkeypatch.setattr(library, "_lib", None)
    monkeypatch.setattr(library, "_path", None)
    return library.load()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded(path) -> str:
    return path.with_name(path.name + ".sha256").read_text().strip()


def computes():
    """The skinny GEMM gives x @ w.T (through the C kernel or its fallback)."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    w = torch.randn(9, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gemm.skinny_linear(x, w, 2), x @ w.T, rtol=1e-5, atol=1e-5)
    return True


def plant(where, marker) -> None:
    """Compile a library whose constructor creates ``marker`` and put it at ``where``."""
    src = marker.parent / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void)'
                   f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    where.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([GCC, "-shared", "-fPIC", "-o", str(where), str(src)],
                   check=True, capture_output=True, timeout=120)


# ----------------------------------------------------------------------------- building


@needs_build
def test_builds_into_the_cache_once_with_its_checksum(fresh, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert library.available(), library.unavailable_reason()
    built = sorted(fresh.iterdir())
    lib = library.path()
    assert [p.name for p in built] == [lib.name, lib.name + ".sha256"]
    assert lib.parent == fresh and lib.name.startswith("pipespec_cpu-")
    assert recorded(lib) == sha256(lib) and lib.stat().st_mode & 0o777 == 0o755
    stamp = lib.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified cached library: loaded without a word
        assert reload(monkeypatch) is not None
    assert library.path() == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert computes()


@needs_build
def test_isa_setting_selects_the_path(copying_cc, fresh, configure):
    configure(skinny_isa="avx2")
    assert gemm.isa() == "avx2"
    assert computes()


# ----------------------------------------------------------------------------- never loaded


@needs_build
def test_planted_library_is_not_loaded(copying_cc, fresh, tmp_path):
    target, marker = library.cached_path(library.compiler()), tmp_path / "ran"
    plant(target, marker)
    with pytest.warns(RuntimeWarning, match="no recorded SHA-256"):
        assert library.load() is not None
    assert not marker.exists()
    assert library.path() == target and recorded(target) == sha256(target)
    assert computes()


@needs_build
def test_replaced_library_is_not_loaded(copying_cc, fresh, monkeypatch, tmp_path):
    library.load()
    target, marker = library.path(), tmp_path / "ran"
    first = recorded(target)
    plant(target, marker)  # its checksum file still holds the built library's hash
    with pytest.warns(RuntimeWarning, match="does not match the SHA-256"):
        assert reload(monkeypatch) is not None
    # rebuilt, and the rebuild's own checksum recorded (each copying_cc build is unique)
    assert not marker.exists() and sha256(target) == recorded(target) != first
    assert computes()


@needs_build
def test_world_writable_library_is_rebuilt(copying_cc, fresh, monkeypatch):
    library.load()
    target = library.path()
    target.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert reload(monkeypatch) is not None
    assert library.path() == target and target.stat().st_mode & 0o777 == 0o755
    assert recorded(target) == sha256(target) and computes()


@needs_build
def test_symlink_in_the_cache_is_not_followed(copying_cc, fresh, tmp_path):
    target, marker = library.cached_path(library.compiler()), tmp_path / "ran"
    elsewhere = tmp_path / "elsewhere.so"
    plant(elsewhere, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(elsewhere)
    target.with_name(target.name + ".sha256").write_text(sha256(elsewhere))
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert library.load() is not None
    assert not marker.exists() and not target.is_symlink() and computes()
    ctypes.CDLL(str(elsewhere))  # control: loading the planted file does run its constructor
    assert marker.exists()


@needs_build
@pytest.mark.skipif(os.getuid() != 0, reason="handing a file to another user needs root")
def test_library_of_another_user_is_rebuilt(copying_cc, fresh, monkeypatch):
    library.load()
    target = library.path()
    os.chown(target, 12345, -1)
    with pytest.warns(RuntimeWarning, match="owned by another user"):
        assert reload(monkeypatch) is not None
    assert target.stat().st_uid == os.getuid() and computes()


@needs_build
def test_untrusted_build_dir_is_not_used(copying_cc, fresh, tmp_path):
    """A build directory others may write to: nothing in it is loaded, even with a matching
    checksum; the library is built in a private temporary directory."""
    target, marker = library.cached_path(library.compiler()), tmp_path / "ran"
    plant(target, marker)
    target.with_name(target.name + ".sha256").write_text(sha256(target))
    fresh.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert library.load() is not None
    assert not marker.exists()
    assert library.path().parent != fresh and library.path().name == target.name
    assert computes()


# ----------------------------------------------------------------------------- fallbacks


def test_fallback_without_compiler(fresh, monkeypatch):
    monkeypatch.setattr(library, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert not gemm.available()
    assert "gcc not found" in library.unavailable_reason()
    assert gemm.isa() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        assert computes()


def test_fallback_when_compilation_fails(fresh, configure):
    cc = fresh.parent / "fake-cc"  # answers --version, fails to compile
    cc.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fake-cc 1.0; exit 0; }\n'
        'echo "error: boom" >&2; exit 1\n'
    )
    cc.chmod(0o755)
    configure(cc=str(cc))
    with pytest.warns(RuntimeWarning, match="boom"):
        assert not gemm.available()
    assert list(fresh.iterdir()) == []  # no partial library or checksum left behind
    assert computes()


def test_fallback_without_avx2(fresh, monkeypatch):
    monkeypatch.setattr(library, "cpu_has_avx2_fma", lambda: False)
    with pytest.warns(RuntimeWarning, match="avx2"):
        assert not gemm.available()
    assert computes()


def test_c_kernels_switch_turns_off_every_kernel(fresh, configure):
    configure(c_kernels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not gemm.available() and not decoder.available()
    assert library.unavailable_reason() == "disabled by PIPESPEC_C_KERNELS=0"
    assert not fresh.exists()  # nothing built
    assert computes()
