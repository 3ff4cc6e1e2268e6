"""The C kernels' threads (hf_am/kernels/cpu_build.py): torch's own OpenMP pool where it can be shared,
pthreads otherwise, and the same bits either way, for every thread count (both passes, and the whole
AM-AdamW step in one call).

Each check runs in a fresh interpreter (the library is loaded once per process, and the threading is
chosen at load time), with the real compiler and a private kernel cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_am.kernels import cpu_build

pytestmark = pytest.mark.skipif(cpu_build.compiler() is None, reason="needs a C compiler")

# Tensors of several chunks (65536 elements each) and ragged tails, so that threads share the work.
_PROBE = r"""
import hashlib, importlib, json, os, sys, threading, torch
for name in filter(None, os.environ.get("PROBE_IMPORT", "").split(",")):
    importlib.import_module(name)  # e.g. a wheel that brings its own libgomp
before = sorted(__import__("hf_am.kernels.cpu_build", fromlist=["x"])._mapped_openmp_runtimes() or [])
from hf_am.kernels import cpu, cpu_build

def run(threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    sizes = (300_001, 65_536, 7, 140_000)
    out = hashlib.sha256()
    for dtype in (torch.float32, torch.float64):
        g = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
        m = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
        v = [torch.rand(n, generator=gen, dtype=dtype) for n in sizes]
        p = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
        k = len(sizes)
        per = lambda x: torch.full((k,), x, dtype=torch.float64)
        sums = cpu.adamw_sums(g, m, v, 0.999, per(1e-8), per(0.9))
        cpu.adamw_update(p, g, m, v, 0.999, per(1e-8), per(1.0), per(0.1), per(0.99), per(-1e-3))
        sgd = cpu.sgd_sums(g, p, m, 1e-2)
        cpu.sgd_update(p, g, m, 1e-2, per(0.1), per(-1e-2))
        hyper = torch.tensor([[0.1], [0.0], [0.9], [0.5]], dtype=torch.float64)
        coef, prods, whole = cpu.adamw_step(
            p, g, m, v, beta2=0.999, eps_scaled=per(1e-8), d_scale=per(0.9), bias2_sqrt=per(0.03), prods=per(0.5),
            eta=per(1e-2), eta_b=per(2e-2), decay=per(0.99), neg_lr=-1e-3, has_restarts=True, scope_ids=range(k),
            n_scopes=k, hyper=hyper, has_threshold=True)
        for t in [sums, sgd, coef, prods, whole, *p, *m, *v]:
            out.update(t.numpy().tobytes())
    return out.hexdigest()

digests = {t: run(t) for t in (1, 2, 3)}
# Two Python threads at once (each opens its own parallel region): the same bits as alone.
side = {}
worker = threading.Thread(target=lambda: side.setdefault("x", run(2)))
worker.start()
here = run(2)
worker.join()
print("PROBE " + json.dumps({
    "threading": cpu_build.threading(),
    "runtimes": sorted(cpu_build._mapped_openmp_runtimes() or []), "before": before,
    "digests": digests, "concurrent": [here, side["x"]],
}))
"""


def _probe(tmp_path, **env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_AM_CACHE": str(tmp_path), **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def test_same_bits_for_every_thread_count_either_threading_and_concurrent_calls(tmp_path):
    shared = _probe(tmp_path / "a")
    own = _probe(tmp_path / "b", HF_AM_CPU_OPENMP="0")
    assert own["threading"] == "pthreads (HF_AM_CPU_OPENMP=0)"
    for result in (shared, own):
        assert len(set(result["digests"].values())) == 1, result["digests"]
        assert result["concurrent"] == [result["digests"]["2"]] * 2
    assert shared["digests"] == own["digests"]


def test_kernels_run_on_torchs_openmp_pool_without_a_second_runtime(tmp_path):
    import torch  # noqa: F401  (torch's runtime is mapped now)

    runtime, why_not = cpu_build.openmp_runtime()
    if runtime is None:
        pytest.skip(f"this torch build has no shareable GNU OpenMP pool here: {why_not}")
    result = _probe(tmp_path)
    assert result["threading"] == f"openmp ({runtime})"
    # Linked against the very runtime torch loaded: no second OpenMP runtime (with its own spinning pool).
    assert result["runtimes"] == [runtime]


def test_torchs_pool_is_found_when_another_wheel_brings_its_own_libgomp(tmp_path):
    # sentencepiece (LlamaTokenizer, the recipes' tokenizer) bundles a renamed libgomp; importing it
    # first must not cost the kernels torch's pool, nor map a third runtime.
    import torch  # noqa: F401

    runtime, why_not = cpu_build.openmp_runtime()
    if runtime is None:
        pytest.skip(f"this torch build has no shareable GNU OpenMP pool here: {why_not}")
    result = _probe(tmp_path, PROBE_IMPORT="sentencepiece")
    assert len(result["before"]) == 2 and runtime in result["before"], result["before"]
    assert result["threading"] == f"openmp ({runtime})"
    assert result["runtimes"] == result["before"]
    assert len(set(result["digests"].values())) == 1


def test_a_compiler_without_openmp_falls_back_to_pthreads_with_the_same_bits(tmp_path):
    real = cpu_build.compiler()
    if "Free Software Foundation" not in subprocess.run([real, "--version"], capture_output=True, text=True).stdout:
        pytest.skip(f"{real} is not GCC: the OpenMP build is never tried")
    # The real compiler, refusing -fopenmp (as a GCC built without libgomp does).
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no libgomp here" >&2; exit 1; }}; done\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o700)
    fallback = _probe(tmp_path / "a", HF_AM_CC=str(wrapper))
    assert fallback["threading"].startswith("pthreads (the OpenMP build failed: ")
    assert "no libgomp here" in fallback["threading"]
    assert set(fallback["digests"].values()) == set(_probe(tmp_path / "b")["digests"].values())


def test_only_gcc_builds_share_libgomp():
    # clang's OpenMP calls (__kmpc_*) are LLVM's ABI, which libgomp does not provide.
    _, why_not = cpu_build.openmp_runtime("/usr/bin/clang", "clang version 17.0.6")
    assert why_not == "/usr/bin/clang is not GCC (libgomp's ABI)"
    _, why_not = cpu_build.openmp_runtime("/usr/bin/cc", "cc (GCC) 12.2.0\nCopyright (C) 2022 Free Software Foundation")
    assert why_not is None or "GCC" not in why_not
