"""Build and cache the C kernel library (``hf_am/csrc/am_cpu_kernels.c``); :mod:`hf_am.kernels.cpu` calls it.

The kernels are plain C compiled on first use with the system C compiler (about
a second), cached in a per-user private directory :func:`cache_dir`
(``$HF_AM_CACHE/kernels/<user>``, default ``~/.cache/hf_am/kernels/<user>``) keyed
by the source, compiler and flags, and loaded with :mod:`ctypes`.  They cover
contiguous float32/float64 CPU tensors, the case where torch's per-op dispatch
makes the multi-tensor path slow (CPU training, DeepSpeed ZeRO-Offload).

The kernels' threads are torch's own OpenMP pool where they can share it: on
Linux, with GCC, when torch's parallel backend is OpenMP and torch's runtime is
GNU libgomp (the only one mapped, or among renamed copies other wheels bring,
the one inside torch's directory), the library is built with ``-fopenmp`` and
linked against exactly that runtime (so its parallel regions run on torch's
team).  Right after the backward pass torch's workers are awake and spinning;
fresh pthreads would compete with them for the cores and cost a thread start
per pass (benchmarks/RESULTS.md measures both).  Elsewhere, with
``HF_AM_CPU_OPENMP=0``, or when that build fails, the kernels start pthreads.
The results are the same either way: each chunk's sums go to their own slot and
are added in chunk order.  :func:`threading` says which one this process uses.

Without a compiler, or with ``HF_AM_CPU_KERNELS=0``, :func:`library` returns
``None`` and the optimizers take the multi-tensor path.  The compiler is
``$HF_AM_CC``, else ``$CC``, else the first of ``cc``, ``gcc``, ``clang``.

Loading a shared object runs its code with the caller's privileges, and a
truncated one kills the process with SIGBUS, so the cache follows these rules:

* The private directory is created with mode 0700.  It is used only when it is a
  real directory (not a symlink), owned by the current user and not writable by
  group or others; otherwise a RuntimeWarning names it and why, and the kernels
  are built in a fresh :func:`tempfile.mkdtemp` directory (0700) for this process
  instead, loaded from there and that directory removed.  The kernels stay on.
* Each install writes a sidecar ``<name>.so.sha256`` (sha256 of the library's
  bytes, written to a temporary name and renamed).  Before loading, the library
  is opened with ``O_NOFOLLOW`` and checked: a regular file, owned by the user,
  not writable by group or others, and the sha256 of its bytes equal to the
  sidecar's.  A library failing any check (truncated, corrupted, replaced,
  symlink, wrong owner or mode, missing or garbled sidecar) is never loaded: a
  RuntimeWarning says why and it is rebuilt in place.  On Linux the library is
  loaded through ``/proc/self/fd`` from the very file descriptor whose bytes were
  hashed; elsewhere by its path inside the 0700 directory.  The loaded library must
  name itself as that file (``am_build_name()``, compiled in): the dynamic loader
  returns a library loaded earlier under the same ``/proc/self/fd/N`` name instead of
  the file, so a mismatch loads again through another descriptor number, and after a
  few tries the kernels are refused (the multi-tensor path runs, with a warning).
* Builds and installs hold an exclusive :func:`fcntl.flock` on
  ``am_cpu_kernels.lock`` in the private directory (waiting at most
  ``LOCK_TIMEOUT_S``, then the multi-tensor path with :func:`build_error` saying
  so), compile to a temporary name and :func:`os.replace` it into place, so
  ranks starting at once end with one good library.  Because every build holds
  the lock, temporary files found while holding it were left by a build that was
  killed, and are removed (by the next build, or by the next load that finds the
  lock free).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading as _threads
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "am_cpu_kernels.c"
COMPILE_FLAGS = ["-O3", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-pthread"]
FLAGS = [*COMPILE_FLAGS[:2], "-shared", *COMPILE_FLAGS[2:]]  # the pthreads build: one command
OPENMP_FLAGS = ["-fopenmp", "-DAM_OPENMP"]  # compile only: the link names torch's runtime itself
_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # file-name prefixes of OpenMP runtimes
PREFIX = "am_cpu_kernels"
LOCK_NAME = f"{PREFIX}.lock"
LOCK_TIMEOUT_S = 300.0  # how long a process waits for another's build before giving up
_DIGEST_MAX = 4096  # bytes read from a sidecar file

_lock = _threads.Lock()
_state = {"tried": False, "lib": None, "error": None, "path": None, "threading": None}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class _Unsafe(Exception):
    """A cache path that must not be used (the message says why)."""


class _NoLock(Exception):
    """The cache's file system does not support flock."""


class _CompileError(RuntimeError):
    """The compiler or linker failed (the OpenMP build then falls back to the pthreads build)."""


@dataclass(frozen=True)
class _Recipe:
    """One way to build the library: on torch's OpenMP runtime ``runtime``, or on pthreads (``None``)."""

    runtime: Optional[str] = None

    def key(self) -> bytes:
        if self.runtime is None:
            return " ".join(FLAGS).encode()
        return b"\0".join([" ".join(COMPILE_FLAGS + OPENMP_FLAGS).encode(), self.runtime.encode()])

    def commands(self, cc: str, obj: Path, out: Path, name: str) -> list:
        named = f'-DAM_BUILD_NAME="{name}"'  # am_build_name(): checked after loading (see _dlopen)
        if self.runtime is None:
            return [[cc, *FLAGS, named, str(SOURCE), "-o", str(out), "-lm"]]
        rpath = os.path.dirname(self.runtime)
        return [
            [cc, *COMPILE_FLAGS, *OPENMP_FLAGS, named, "-c", str(SOURCE), "-o", str(obj)],
            # Linked against the runtime file itself (not -lgomp, which could name a second copy):
            # its soname is already loaded, so the dynamic loader reuses torch's.
            [cc, "-shared", str(obj), self.runtime, f"-Wl,-rpath,{rpath}", "-o", str(out), "-lm", "-pthread"],
        ]


def _mapped_openmp_runtimes() -> Optional[set]:
    """Paths of the OpenMP runtimes mapped in this process (Linux), ``None`` where it cannot be read."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return None
    found = set()
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(_OPENMP_RUNTIMES):
            found.add(fields[5])
    return found


def openmp_runtime(cc: Optional[str] = None, version: str = "", mapped: Optional[set] = None) -> Tuple[Optional[str], Optional[str]]:
    """``(path, None)`` of the GNU OpenMP runtime torch runs its thread pool on, when the kernels can
    be built to share it, else ``(None, why not)``.  ``mapped``: what :func:`_mapped_openmp_runtimes`
    returned, when the caller has read it already (``None``: read it here)."""
    if os.environ.get("HF_AM_CPU_OPENMP", "1") == "0":
        return None, "HF_AM_CPU_OPENMP=0"
    if platform.system() != "Linux":
        return None, f"not Linux ({platform.system()})"
    if cc is not None and ("Free Software Foundation" not in version or "clang" in version.lower()):
        return None, f"{cc} is not GCC (libgomp's ABI)"
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "torch's parallel backend is not OpenMP"
    runtimes = _mapped_openmp_runtimes() if mapped is None else mapped
    if runtimes is None:
        return None, "/proc/self/maps cannot be read"
    gnu = sorted(p for p in runtimes if os.path.basename(p).startswith("libgomp") and os.path.isfile(p))
    if len(gnu) > 1:
        # Other wheels bundle their own renamed copy (sentencepiece: libgomp-<hash>.so); torch's own is
        # the one inside torch's directory.
        torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
        gnu = [p for p in gnu if os.path.realpath(p).startswith(torch_dir)]
    if len(gnu) != 1:
        return None, (
            f"torch's GNU OpenMP runtime is not the one libgomp among those mapped "
            f"({', '.join(sorted(runtimes)) or 'none'})"
        )
    return gnu[0], None


def threading() -> Optional[str]:
    """How the loaded kernels run their threads, e.g. ``"openmp (/…/torch/lib/libgomp.so.1)"`` or
    ``"pthreads (HF_AM_CPU_OPENMP=0)"``; ``None`` before :func:`library` or when it is unavailable."""
    library()
    return _state["threading"]


def compiler() -> Optional[str]:
    for candidate in (os.environ.get("HF_AM_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
            if candidate == os.environ.get("HF_AM_CC"):
                return candidate  # an explicit choice that does not exist: let the build report it
    return None


def _user() -> str:
    """The private directory's name: the user name when it is a plain one, else the numeric uid."""
    uid = os.geteuid()
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        name = ""
    if name and name not in (".", "..") and all(c.isalnum() or c in "._-" for c in name):
        return name
    return str(uid)


def cache_dir() -> Path:
    """The per-user private directory the kernel library is cached in:
    ``$HF_AM_CACHE/kernels/<user>`` (default ``~/.cache/hf_am/kernels/<user>``).

    The directory is created (mode 0700) on first build.  When it turns out to be
    unsafe (a symlink, owned by someone else, writable by group or others) the
    library is built in a temporary directory instead; see the module docstring.
    """
    root = Path(os.environ.get("HF_AM_CACHE") or Path.home() / ".cache" / "hf_am")
    return root / "kernels" / _user()


def build_error() -> Optional[str]:
    """Why the kernels are unavailable (after :func:`library` returned ``None``)."""
    return _state["error"]


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; ``None`` when unavailable."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _load()
            except Exception as exc:  # no compiler, read-only cache, ... : fall back, say why once
                _state["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"hf_am: fused CPU kernels unavailable ({_state['error']}); using the multi-tensor path",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["lib"]


def _warn(message: str) -> None:
    warnings.warn(f"hf_am: {message}", RuntimeWarning, stacklevel=4)


def _problem(st: os.stat_result, kind: str) -> Optional[str]:
    """Why a file or directory with this (l)stat must not be trusted, or ``None``."""
    want = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not want(st.st_mode):
        return f"is not a {'directory' if kind == 'directory' else 'regular file'}"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by the current user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _open_private_dir(path: Path) -> int:
    """An ``O_DIRECTORY`` descriptor of the private directory, creating it 0700; raises :class:`_Unsafe`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    try:
        before = os.lstat(path)
    except FileNotFoundError as exc:  # removed between the mkdir and here
        raise _Unsafe(f"{path} vanished while being opened") from exc
    if stat.S_ISLNK(before.st_mode):
        raise _Unsafe(f"{path} is a symbolic link")
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        raise _Unsafe(f"{path} cannot be opened ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise _Unsafe(f"{path} was replaced while being opened")
        if created and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o700)  # explicit: the mode given to mkdir is only narrowed by the umask
            st = os.fstat(fd)
        why = _problem(st, "directory")
        if why:
            raise _Unsafe(f"{path} {why}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_fd(fd: int, limit: Optional[int] = None) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if limit is not None and total > limit:
            raise ValueError("too large")


def _open_checked(dfd: int, name: str) -> Tuple[int, os.stat_result]:
    """Open ``name`` in the directory ``dfd`` read-only without following links; raise :class:`_Unsafe`
    (or FileNotFoundError) unless it is a regular file owned by the user and not group/other-writable."""
    before = os.stat(name, dir_fd=dfd, follow_symlinks=False)  # FileNotFoundError: not there
    why = _problem(before, "file")
    if why:
        raise _Unsafe(why)
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Unsafe("is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})") from exc
    st = os.fstat(fd)
    why = _problem(st, "file")
    if why is None and (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        why = "was replaced while being opened"
    if why:
        os.close(fd)
        raise _Unsafe(why)
    return fd, st


def _recorded_digest(dfd: int, name: str) -> str:
    """The sha256 recorded in ``<name>.sha256``; raises :class:`_Unsafe` when missing, unsafe or garbled."""
    side = f"{name}.sha256"
    try:
        fd, _ = _open_checked(dfd, side)
    except FileNotFoundError as exc:
        raise _Unsafe(f"has no digest file {side}") from exc
    except _Unsafe as exc:
        raise _Unsafe(f"has a digest file {side} that {exc}") from exc
    try:
        text = _read_fd(fd, _DIGEST_MAX)
    except ValueError as exc:
        raise _Unsafe(f"has a garbled digest file {side}") from exc
    finally:
        os.close(fd)
    fields = text.split()
    digest = fields[0].decode("ascii", "replace").lower() if fields else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _Unsafe(f"has a garbled digest file {side}")
    return digest


def _verified(dfd: int, name: str) -> int:
    """A descriptor of the library ``name`` whose bytes match its recorded digest; raises
    FileNotFoundError when it is not there, :class:`_Unsafe` saying why it must not be loaded."""
    fd, st = _open_checked(dfd, name)  # FileNotFoundError propagates to the caller
    try:
        data = _read_fd(fd)
        if len(data) != st.st_size:
            raise _Unsafe(f"changed size while being read ({st.st_size} -> {len(data)} bytes)")
        expected = _recorded_digest(dfd, name)
        actual = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(actual, expected):
            raise _Unsafe(f"does not match its digest ({len(data)} bytes, sha256 {actual[:12]}..., recorded {expected[:12]}...): truncated, corrupted or replaced")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_existing(dfd: int, name: str) -> Tuple[Optional[int], Optional[str]]:
    """``(fd, None)`` for a good cached library, ``(None, None)`` when there is none, ``(None, why)`` when bad."""
    try:
        return _verified(dfd, name), None
    except FileNotFoundError:
        return None, None
    except _Unsafe as exc:
        return None, str(exc)


def _flock(dfd: int, where: Path) -> int:
    """Hold an exclusive flock on the lock file in ``dfd`` (waiting at most LOCK_TIMEOUT_S)."""
    import fcntl

    try:
        fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:  # ELOOP: a symbolic link in its place; EACCES: not ours
        raise _Unsafe(f"{where / LOCK_NAME} cannot be opened safely ({exc.strerror or exc})") from exc
    try:
        why = _problem(os.fstat(fd), "file")
        if why:
            raise _Unsafe(f"{where / LOCK_NAME} {why}")
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"waited {LOCK_TIMEOUT_S:.0f} s for {where / LOCK_NAME}, held by another build"
                    ) from None
                time.sleep(0.05)
            except OSError as exc:  # ENOLCK, EOPNOTSUPP, ...: a file system without flock
                raise _NoLock(f"{where / LOCK_NAME} cannot be locked ({exc.strerror})") from exc
    except BaseException:
        os.close(fd)
        raise


def _is_temp(entry: str) -> bool:
    return entry.startswith(PREFIX + "-") and (entry.endswith(".tmp.so") or entry.endswith(".tmp"))


def _remove_stale_temps(dfd: int) -> None:
    """Remove the temporary files of killed builds (called holding the lock, so none is live)."""
    for entry in os.listdir(dfd):
        if _is_temp(entry):
            try:
                if not stat.S_ISDIR(os.stat(entry, dir_fd=dfd, follow_symlinks=False).st_mode):
                    os.unlink(entry, dir_fd=dfd)
            except FileNotFoundError:
                pass


def _clean_if_idle(dfd: int, where: Path) -> None:
    """Remove stale temporary files when no build holds the lock (never waits; best effort)."""
    import fcntl

    try:
        fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=dfd)
    except OSError:
        return
    try:
        if _problem(os.fstat(fd), "file") is None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _remove_stale_temps(dfd)
    except OSError:
        pass  # a build is running (it cleans up itself), or no flock here
    finally:
        os.close(fd)


def _write_digest(dfd: int, name: str, digest: str, token: str) -> None:
    side = f"{name}.sha256"
    tmp = f"{side}.{token}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=dfd)
    try:
        os.write(fd, f"{digest}  {name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, side, src_dir_fd=dfd, dst_dir_fd=dfd)


def _build(cc: str, where: Path, dfd: int, name: str, recipe: _Recipe) -> int:
    """Compile into ``where`` (descriptor ``dfd``) under a temporary name, record its digest and install
    it as ``name``; returns a descriptor of the installed file, whose bytes are the ones hashed."""
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp = f"{name[: -len('.so')]}.{token}.tmp.so"
    obj = f"{name[: -len('.so')]}.{token}.tmp"
    try:
        for command in recipe.commands(cc, where / obj, where / tmp, name):
            proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise _CompileError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        try:
            fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise RuntimeError(f"{cc} left no readable output {where / tmp} ({exc.strerror})") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise _Unsafe(f"{where / tmp} is not a regular file of the current user")
            os.fchmod(fd, 0o700)  # gcc's 0777 & ~umask can be group-writable (umask 002)
            data = _read_fd(fd)
            if len(data) != st.st_size or (platform.system() == "Linux" and not data.startswith(b"\x7fELF")):
                raise RuntimeError(f"{cc} wrote an incomplete library {where / tmp} ({len(data)} bytes)")
            os.fsync(fd)
            # Install the digest first: a process killed between the two renames leaves a pair that
            # does not match, which the next run rebuilds.
            _write_digest(dfd, name, hashlib.sha256(data).hexdigest(), token)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return fd
        except BaseException:
            os.close(fd)
            raise
    finally:
        for leftover in (tmp, obj):
            try:
                os.unlink(leftover, dir_fd=dfd)
            except FileNotFoundError:
                pass


_DLOPEN_TRIES = 8


def _build_name(lib: ctypes.CDLL) -> Optional[str]:
    """The file name a library of this source was built for (``None``: not one of ours)."""
    try:
        fn = lib.am_build_name
    except AttributeError:
        return None
    fn.argtypes, fn.restype = [], ctypes.c_char_p
    return (fn() or b"").decode(errors="replace")


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """Load the library open as ``fd`` (whose bytes were verified): through ``/proc/self/fd`` on
    Linux, so that exactly that file is mapped, else by its path inside the private directory.

    The dynamic loader knows libraries by the name they were loaded under: given
    ``/proc/self/fd/N`` again after another library was loaded through a descriptor N since closed
    (another hf_am in the process, or anything else loading that way), it returns that other
    library.  So the loaded library must name itself (``am_build_name()``, compiled in) as the file
    verified; otherwise it is loaded again through a descriptor number not used before, and after
    a few tries the kernels are refused rather than run from another file.
    """
    proc = f"/proc/self/fd/{fd}"
    if platform.system() != "Linux" or not os.path.exists(proc):
        return _named(ctypes.CDLL(str(path)), path)
    import fcntl

    duplicates = []
    try:
        for attempt in range(_DLOPEN_TRIES):
            lib = ctypes.CDLL(proc)
            if _build_name(lib) == path.name:
                return lib
            # the lowest free descriptor number at or above a point that rises with every try (below
            # the usual limit of 1024 open files)
            duplicates.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100 * (attempt + 1) + os.getpid() % 50))
            proc = f"/proc/self/fd/{duplicates[-1]}"
        return _named(lib, path)
    finally:
        for extra in duplicates:
            os.close(extra)


def _named(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    found = _build_name(lib)
    if found != path.name:
        raise RuntimeError(
            f"loading {path} gave another library ({found or 'one that is not an hf_am kernel build'}): "
            "the dynamic loader returned a library loaded earlier under the same name"
        )
    return lib


def _obtain(cc: str, where: Path, dfd: int, name: str, shared: bool, recipe: _Recipe) -> ctypes.CDLL:
    """Load the verified library ``name`` from the directory ``dfd``, (re)building it when missing or bad."""
    fd, why = _check_existing(dfd, name)
    if fd is not None and any(_is_temp(entry) for entry in os.listdir(dfd)):
        _clean_if_idle(dfd, where)  # a killed build's leftovers next to a good library
    if fd is None:
        lock = _flock(dfd, where)
        try:
            fd, why_now = _check_existing(dfd, name)  # another rank may have just built it
            if fd is None:
                why = why_now  # None: it went missing, nothing to warn about
                if why and shared:
                    _warn(f"not loading the cached CPU kernel library {where / name}: it {why}; rebuilding it")
                _remove_stale_temps(dfd)
                fd = _build(cc, where, dfd, name, recipe)
        finally:
            os.close(lock)  # releases the flock
    try:
        lib = _dlopen(fd, where / name)
    finally:
        os.close(fd)
    _state["path"] = str(where / name)
    return lib


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("HF_AM_CPU_KERNELS", "1") == "0":
        raise RuntimeError("disabled by HF_AM_CPU_KERNELS=0")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set HF_AM_CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    before = _mapped_openmp_runtimes()  # read once for the choice and once after loading, to compare
    runtime, why_not = openmp_runtime(cc, version, before)
    lib = None
    if runtime is not None:
        try:
            lib = _load_recipe(cc, version, _Recipe(runtime))
            after = _mapped_openmp_runtimes()
            if after is not None and after != before:  # the loader should have reused torch's
                _warn(f"the CPU kernels mapped another OpenMP runtime ({', '.join(sorted(after - before))})")
        except _CompileError as exc:
            why_not = f"the OpenMP build failed: {str(exc)[:300]}"
    if lib is None:
        lib = _load_recipe(cc, version, _Recipe())
    lib = _declare(lib)
    # Reported by the loaded binary itself, not inferred from the recipe asked for.
    _state["threading"] = f"openmp ({runtime})" if lib.am_threading() == 1 else f"pthreads ({why_not})"
    return lib


def _load_recipe(cc: str, version: str, recipe: _Recipe) -> ctypes.CDLL:
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), cc.encode(), version.encode(), recipe.key(), platform.machine().encode()])
    ).hexdigest()[:16]
    name = f"{PREFIX}-{key}.so"
    where = cache_dir()
    try:
        dfd = _open_private_dir(where)
    except _Unsafe as exc:
        _warn(f"not using the kernel cache: {exc}; building the CPU kernels in a private temporary directory")
        dfd = None
    except OSError as exc:  # e.g. a read-only cache, or a team directory another user created 0755
        _warn(f"cannot create the kernel cache {where} ({exc.strerror or exc}); building the CPU kernels in a private temporary directory")
        dfd = None
    lib = None
    if dfd is not None:
        try:
            lib = _obtain(cc, where, dfd, name, True, recipe)
        except (_NoLock, _Unsafe) as exc:
            _warn(f"not using the kernel cache: {exc}; building the CPU kernels in a private temporary directory")
        except TimeoutError:
            raise  # another build holds the lock: fall back to the multi-tensor path (no second build)
        except OSError as exc:  # e.g. a directory where the library belongs
            _warn(f"not using the kernel cache: {exc}; building the CPU kernels in a private temporary directory")
        finally:
            os.close(dfd)
    if lib is None:
        scratch = Path(tempfile.mkdtemp(prefix="hf_am-kernels-"))  # 0700, owned by the user
        try:
            os.chmod(scratch, 0o700)
            dfd = _open_private_dir(scratch)
            try:
                lib = _obtain(cc, scratch, dfd, name, False, recipe)
            finally:
                os.close(dfd)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # the mapping outlives the file
    return lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the entry points' C signatures (ctypes would otherwise pass doubles as ints)."""
    i64, ptr, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    head = [ctypes.c_int, ctypes.c_int, i64, ptr]  # dtype bits, threads, n, numel
    lib.am_adamw_sums.argtypes = head + [ptr, ptr, ptr, dbl, ptr, ptr, ptr]
    lib.am_adamw_update.argtypes = head + [ptr, ptr, ptr, ptr, dbl, ptr, ptr, ptr, ptr, ptr]
    lib.am_sgd_sums.argtypes = head + [ptr, ptr, ptr, dbl, ptr]
    lib.am_sgd_update.argtypes = head + [ptr, ptr, ptr, dbl, ptr, ptr]
    lib.am_coefficients.argtypes = [i64, ptr, ptr, i64, ctypes.c_int, ptr, ptr]
    lib.am_adamw_step.argtypes = head + [ptr, ptr, ptr, ptr, dbl, ptr, ptr, ptr, ptr, ptr, ptr, ptr, dbl, ctypes.c_int,
                                         ptr, i64, ptr, i64, ctypes.c_int, ptr, ptr, ptr]
    lib.am_adamw_step_tasks.argtypes = [ctypes.c_int, ctypes.c_int, i64, ptr, ptr]
    lib.am_adamw_step_tasks.restype = i64
    lib.am_adamw_scalars.argtypes = [ctypes.c_int, i64, ptr, ptr, dbl, dbl, ptr]
    lib.am_store_scalars.argtypes = [i64, ptr, ptr, ptr, ptr]
    lib.am_threading.argtypes = []
    for fn in (lib.am_adamw_sums, lib.am_adamw_update, lib.am_sgd_sums, lib.am_sgd_update, lib.am_coefficients,
               lib.am_adamw_step, lib.am_adamw_scalars, lib.am_store_scalars, lib.am_threading):
        fn.restype = ctypes.c_int
    return lib
