"""The C kernel cache (hf_am/kernels/cpu_build.py) on a shared machine: a per-user 0700 directory,
digest-checked libraries, no library that someone else could have written, no leftovers of killed
builds, and one good library when ranks build at once.

Every check runs the load in a fresh interpreter (``library()`` caches per process), with real
files and the real compiler, and ends with an AMAdamW step whose parameters must be finite (and
equal to a clean build's).  A library that must never be loaded is stood in for by one whose
constructor writes a marker file: the marker appearing means it was loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_am.kernels import cpu_build

pytestmark = pytest.mark.skipif(
    cpu_build.compiler() is None or not hasattr(os, "geteuid"), reason="needs a C compiler and POSIX"
)

USER = cpu_build._user()

_PROBE = """
import json, math, os, warnings, torch
from hf_am import AMAdamW
from hf_am.kernels import cpu_build
if os.environ.get("PROBE_LOCK_TIMEOUT"):
    cpu_build.LOCK_TIMEOUT_S = float(os.environ["PROBE_LOCK_TIMEOUT"])
if os.environ.get("PROBE_DECOYS"):  # load other libraries through /proc/self/fd/N, then close those N
    import ctypes
    folder = os.environ["PROBE_DECOYS"]
    fds = [os.open(os.path.join(folder, f), os.O_RDONLY) for f in sorted(os.listdir(folder))]
    decoys = [ctypes.CDLL(f"/proc/self/fd/{fd}") for fd in fds]
    for fd in fds:
        os.close(fd)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float32))
    p.grad = torch.randn(64, dtype=torch.float32)
    AMAdamW([p], lr=1e-2).step()
print("PROBE " + json.dumps({
    "lib": cpu_build.library() is not None,
    "err": cpu_build.build_error(),
    "path": cpu_build._state.get("path"),
    "name": cpu_build._build_name(cpu_build.library()) if cpu_build.library() is not None else None,
    "warn": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "p": p.detach().tolist(),
}))
"""

_EVIL = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void mark(void) {
    const char *path = getenv("HF_AM_TEST_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("loaded\n", f); fclose(f); }
}
int am_adamw_sums(void) { return 0; }
int am_adamw_update(void) { return 0; }
int am_sgd_sums(void) { return 0; }
int am_sgd_update(void) { return 0; }
"""


def _env(cache: Path, marker: Path, **extra) -> dict:
    env = {**os.environ, "HF_AM_CACHE": str(cache), "HF_AM_TEST_MARKER": str(marker), "HF_HUB_OFFLINE": "1", **extra}
    env.pop("HF_AM_CPU_KERNELS", None)
    return env


def _parse(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"probe died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, proc.stdout + proc.stderr
    out = json.loads(lines[-1][len("PROBE ") :])
    assert all(math.isfinite(v) for v in out["p"]), out["p"]
    return out


def probe(cache: Path, marker: Path, umask=None, **extra) -> dict:
    kwargs = {} if umask is None else {"umask": umask}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=400, env=_env(cache, marker, **extra), **kwargs
    )  # fmt: skip
    return _parse(proc)


def private(cache: Path) -> Path:
    return cache / "kernels" / USER


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(d: Path):
    return sorted(e.name for e in d.iterdir() if ".tmp" in e.name)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One clean build (umask 0, which must not widen anything): the cache directory, the probe
    output, the library's name and bytes."""
    cache = tmp_path_factory.mktemp("clean")
    marker = cache / "marker"
    out = probe(cache, marker, umask=0)
    assert out["lib"] and out["warn"] == [] and out["err"] is None, out
    libs = sorted(private(cache).glob("*.so"))
    assert len(libs) == 1, libs
    return {"cache": cache, "out": out, "name": libs[0].name, "bytes": libs[0].read_bytes()}


@pytest.fixture(scope="module")
def evil_so(tmp_path_factory) -> Path:
    """A valid shared library whose constructor writes $HF_AM_TEST_MARKER."""
    d = tmp_path_factory.mktemp("evil")
    (d / "evil.c").write_text(_EVIL)
    subprocess.run([cpu_build.compiler(), "-shared", "-fPIC", str(d / "evil.c"), "-o", str(d / "evil.so")], check=True)
    return d / "evil.so"


@pytest.fixture
def cache(clean, tmp_path):
    """A copy of the clean cache (modes kept) for one test to damage; yields (cache, lib, marker)."""
    dst = tmp_path / "cache"
    shutil.copytree(clean["cache"] / "kernels", dst / "kernels", symlinks=True)
    lib = private(dst) / clean["name"]
    assert lib.read_bytes() == clean["bytes"]
    return dst, lib, tmp_path / "marker"


def assert_good_rebuild(clean, lib: Path, out: dict, marker: Path, *, bad_bytes=None, warn_has=None):
    """The probe used the kernels from ``lib``, a regular 0700 file matching its sidecar; the bad file
    was never loaded; the step equals the clean build's."""
    assert out["lib"] and out["err"] is None, out
    assert out["path"] == str(lib)
    assert not marker.exists(), "the untrusted library was loaded (its constructor ran)"
    st = os.lstat(lib)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert (lib.parent / (lib.name + ".sha256")).read_text().split()[0] == sha256(lib)
    assert len(lib.read_bytes()) == len(clean["bytes"])
    if bad_bytes is not None:
        assert lib.read_bytes() != bad_bytes
    if warn_has is not None:
        assert any(warn_has in w and str(lib) in w for w in out["warn"]), out["warn"]
    assert out["p"] == clean["out"]["p"]
    assert temps(lib.parent) == []


def test_private_dir_is_0700_and_a_good_library_loads_without_rebuild(clean, cache):
    cache_root, lib, marker = cache
    d = private(clean["cache"])
    assert d.parent == clean["cache"] / "kernels" and d.name == USER
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700  # built with umask 0
    so = d / clean["name"]
    assert not os.lstat(so).st_mode & 0o022 and os.lstat(so).st_uid == os.geteuid()
    assert (d / (clean["name"] + ".sha256")).read_text().split()[0] == hashlib.sha256(clean["bytes"]).hexdigest()
    assert sorted(e.name for e in d.iterdir()) == sorted([clean["name"], clean["name"] + ".sha256", "am_cpu_kernels.lock"])
    assert clean["out"]["path"] == str(so)
    before = os.lstat(lib)
    out = probe(cache_root, marker)
    assert out["lib"] and out["warn"] == [] and out["path"] == str(lib)
    after = os.lstat(lib)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # loaded, not rebuilt
    assert out["p"] == clean["out"]["p"]


def test_cache_dir_follows_hf_am_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_AM_CACHE", str(tmp_path))
    assert cpu_build.cache_dir() == tmp_path / "kernels" / USER
    monkeypatch.delenv("HF_AM_CACHE")
    assert cpu_build.cache_dir() == Path.home() / ".cache" / "hf_am" / "kernels" / USER


def test_truncated_library_is_rebuilt_not_loaded(clean, cache):
    cache_root, lib, marker = cache
    bad = clean["bytes"][: len(clean["bytes"]) // 3]  # what a full disk leaves: loading it is SIGBUS
    lib.write_bytes(bad)
    out = probe(cache_root, marker)  # _parse asserts returncode 0
    assert_good_rebuild(clean, lib, out, marker, bad_bytes=bad, warn_has="does not match its digest")


def test_corrupted_same_size_library_is_rebuilt(clean, cache):
    cache_root, lib, marker = cache
    data = bytearray(clean["bytes"])
    data[0x1000:0x3000] = b"\xff" * 0x2000  # same size, garbage code
    lib.write_bytes(bytes(data))
    assert lib.stat().st_size == len(clean["bytes"])
    out = probe(cache_root, marker)
    assert_good_rebuild(clean, lib, out, marker, bad_bytes=bytes(data), warn_has="does not match its digest")


def test_replaced_library_is_rebuilt_and_never_loaded(clean, cache, evil_so):
    cache_root, lib, marker = cache
    shutil.copyfile(evil_so, lib)  # a different, valid library; the sidecar still names the real one
    out = probe(cache_root, marker)
    assert_good_rebuild(clean, lib, out, marker, bad_bytes=evil_so.read_bytes(), warn_has="does not match its digest")


@pytest.mark.parametrize("digest", ["wrong", "garbled", "missing"])
def test_digest_file_mismatch_triggers_rebuild(clean, cache, digest):
    cache_root, lib, marker = cache
    side = lib.parent / (lib.name + ".sha256")
    if digest == "wrong":
        side.write_text(hashlib.sha256(b"something else").hexdigest() + "  " + lib.name + "\n")
        expect = "does not match its digest"
    elif digest == "garbled":
        side.write_text("not a digest\n")
        expect = "garbled digest file"
    else:
        side.unlink()
        expect = "has no digest file"
    before = os.lstat(lib).st_ino
    out = probe(cache_root, marker)
    assert_good_rebuild(clean, lib, out, marker, warn_has=expect)
    assert os.lstat(lib).st_ino != before  # rebuilt and installed anew


def _plant(lib: Path, evil_so: Path) -> None:
    """Put the marker library in place of ``lib`` with a sidecar that matches it."""
    shutil.copyfile(evil_so, lib)
    (lib.parent / (lib.name + ".sha256")).write_text(sha256(lib) + "  " + lib.name + "\n")


def test_group_or_other_writable_library_is_not_loaded(clean, cache, evil_so):
    cache_root, lib, marker = cache
    _plant(lib, evil_so)  # its digest matches: only the mode says not to trust it
    os.chmod(lib, 0o666)
    out = probe(cache_root, marker)
    assert_good_rebuild(clean, lib, out, marker, warn_has="is writable by group or others (mode 0666)")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_library_owned_by_another_user_is_not_loaded(clean, cache, evil_so):
    cache_root, lib, marker = cache
    _plant(lib, evil_so)
    os.chmod(lib, 0o755)
    os.chown(lib, 65534, 65534)
    out = probe(cache_root, marker)
    assert_good_rebuild(clean, lib, out, marker, warn_has="is owned by uid 65534")


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "symlink"])
def test_unsafe_private_dir_is_not_used(clean, cache, evil_so, tmp_path, how):
    cache_root, lib, marker = cache
    _plant(lib, evil_so)
    d = lib.parent
    if how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        for entry in [d, *d.iterdir()]:
            os.chown(entry, 65534, 65534)
        expect = f"{d} is owned by uid 65534"
    elif how == "group-writable":
        os.chmod(d, 0o770)
        expect = f"{d} is writable by group or others (mode 0770)"
    else:
        elsewhere = tmp_path / "elsewhere"
        d.rename(elsewhere)
        d.symlink_to(elsewhere, target_is_directory=True)
        d = elsewhere
        expect = f"{lib.parent} is a symbolic link"
    listing = {e.name: sha256(e) for e in d.iterdir() if e.is_file()}
    out = probe(cache_root, marker)
    assert out["lib"] and out["err"] is None, out  # built in a private temporary directory instead
    assert not marker.exists(), "a library from the untrusted directory was loaded"
    assert out["path"] and not out["path"].startswith(str(cache_root)), out["path"]
    assert any(expect in w and "private temporary directory" in w for w in out["warn"]), out["warn"]
    assert {e.name: sha256(e) for e in d.iterdir() if e.is_file()} == listing  # nothing written there
    assert not Path(out["path"]).exists()  # the temporary directory is gone
    assert out["p"] == clean["out"]["p"]


def test_symlink_in_place_of_the_library_is_refused(clean, cache, evil_so, tmp_path):
    cache_root, lib, marker = cache
    target = tmp_path / "target.so"
    shutil.copyfile(evil_so, target)
    os.chmod(target, 0o700)
    lib.unlink()
    lib.symlink_to(target)
    (lib.parent / (lib.name + ".sha256")).write_text(sha256(target) + "  " + lib.name + "\n")  # matches the target
    out = probe(cache_root, marker)
    assert_good_rebuild(clean, lib, out, marker, warn_has="is a symbolic link")
    assert target.read_bytes() == evil_so.read_bytes()  # the link's target was not written through


def _wrapper(tmp_path: Path, body: str) -> Path:
    """An HF_AM_CC that runs ``body`` before (or instead of) the real compiler."""
    script = tmp_path / "cc-wrapper"
    real = cpu_build.compiler()
    script.write_text(f'#!/bin/sh\nreal={real}\ncase "$1" in --version) exec "$real" --version;; esac\n{body}\nexec "$real" "$@"\n')
    script.chmod(0o755)
    return script


def test_temp_files_of_a_killed_build_are_removed(clean, cache, tmp_path):
    cache_root, lib, marker = cache
    d = lib.parent
    # A build that is killed while compiling: the wrapper writes part of the output, then hangs.
    cc = _wrapper(tmp_path, 'for a; do [ "$prev" = -o ] && out=$a; prev=$a; done\nhead -c 1000 "$real" > "$out"\nsleep 600')
    killed = subprocess.Popen(
        [sys.executable, "-c", _PROBE], env=_env(cache_root, marker, HF_AM_CC=str(cc)), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not temps(d) and time.monotonic() < deadline and killed.poll() is None:
            time.sleep(0.2)
        assert killed.poll() is None, "the build did not start"
        left = temps(d)
        # the compile's output: the library itself (pthreads build) or the object file (OpenMP build)
        assert left and all(name.endswith((".tmp.so", ".tmp")) and name.startswith(cpu_build.PREFIX + "-") for name in left), left
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the job is killed, compiler and all
        killed.wait()
    assert temps(d) == left  # the kill left it behind
    out = probe(cache_root, marker)  # a normal run: the good library is there, the lock is free
    assert out["lib"] and out["warn"] == [] and out["path"] == str(lib)
    assert temps(d) == []
    assert out["p"] == clean["out"]["p"]


def test_four_processes_building_at_once_end_with_one_library(clean, tmp_path):
    cache_root, marker = tmp_path / "cache", tmp_path / "marker"
    log = tmp_path / "compiles"
    # Slow compiles, so that builds would overlap; a build compiles the source once (and the OpenMP
    # build links in a second call), so the log counts the calls that name the source.
    cc = _wrapper(tmp_path, f'case "$*" in *am_cpu_kernels.c*) echo $$ >> "{log}";; esac\nsleep 4')
    env = _env(cache_root, marker, HF_AM_CC=str(cc))
    procs = [
        subprocess.Popen([sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=500)
        outs.append(_parse(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)))
    d = private(cache_root)
    libs = sorted(d.glob("*.so"))
    assert len(libs) == 1, libs
    assert sorted(e.name for e in d.iterdir()) == sorted([libs[0].name, libs[0].name + ".sha256", "am_cpu_kernels.lock"])
    assert (d / (libs[0].name + ".sha256")).read_text().split()[0] == sha256(libs[0])
    assert len(log.read_text().split()) == 1  # one build; the others waited and loaded it
    for out in outs:
        assert out["lib"] and out["err"] is None and out["warn"] == [] and out["path"] == str(libs[0]), out
        assert out["p"] == clean["out"]["p"]


def test_a_build_lock_held_too_long_falls_back_without_hanging(clean, cache):
    cache_root, lib, marker = cache
    lib.unlink()  # a build is needed, and another process holds the lock
    fd = os.open(lib.parent / "am_cpu_kernels.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = time.monotonic()
        out = probe(cache_root, marker, PROBE_LOCK_TIMEOUT="2")
        assert time.monotonic() - start < 200
    finally:
        os.close(fd)
    assert not out["lib"] and "waited 2 s" in out["err"] and "am_cpu_kernels.lock" in out["err"], out
    assert any("multi-tensor path" in w for w in out["warn"])
    assert out["p"] == pytest.approx(clean["out"]["p"], abs=1e-6)  # the multi-tensor path, same step
    assert not lib.exists() and temps(lib.parent) == []


def test_a_library_loaded_earlier_under_the_descriptor_name_is_not_taken_for_ours(clean, cache, tmp_path):
    """The dynamic loader knows libraries by the name they were loaded under: ``/proc/self/fd/N`` of a
    descriptor since closed names whatever was loaded through it before, and dlopen returns that
    library.  Sixteen other libraries loaded that way take the descriptor numbers the load will use;
    the library in use must still be the verified file (it names itself, ``am_build_name()``)."""
    cache_root, lib, marker = cache
    decoys = tmp_path / "decoys"
    decoys.mkdir()
    source = tmp_path / "decoy.c"
    source.write_text("int am_threading(void) { return 7; }\n")
    subprocess.run([cpu_build.compiler(), "-shared", "-fPIC", str(source), "-o", str(tmp_path / "decoy.so")], check=True)
    for i in range(16):  # separate files: the loader also recognises a file it has loaded by its inode
        shutil.copy(tmp_path / "decoy.so", decoys / f"decoy{i:02d}.so")
    out = probe(cache_root, marker, PROBE_DECOYS=str(decoys))
    assert out["lib"] and out["err"] is None and out["warn"] == [], out
    assert out["name"] == lib.name and out["path"] == str(lib)
    assert out["p"] == clean["out"]["p"]  # the kernels' step, the clean build's bits
