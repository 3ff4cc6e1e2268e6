"""The benchmark scripts run and write their outputs (``--quick``); no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "trainer_overhead.py"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_trainer_overhead_help():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--pairs" in proc.stdout


def test_trainer_overhead_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    proc = _run("--quick", "--out-dir", str(tmp_path), "--tag", "smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = tmp_path / "trainer_overhead_smoke.md"
    png = tmp_path / "trainer_overhead_smoke.png"
    assert md.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "CPU:" in text and "torch" in text
    assert "| tiny |" in text and "am_adamw" in text and "adamw_torch (foreach)" in text
    assert "--quick" in text  # the command that reproduces it


def test_optimizer_overhead_writes_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    md = tmp_path / "oo.md"
    script = ROOT / "benchmarks" / "optimizer_overhead.py"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(script), "--sizes", "1", "2", "--repeats", "1", "--rounds", "1", "--only", "AdamW",
         "--markdown", str(md)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = md.read_text()
    assert text.startswith("CPU:") and "torch" in text.splitlines()[0]  # the machine, first
    assert "--sizes 1 2" in text  # the command that reproduces it
    assert "| AM-AdamW tensor |" in text and "| AdamW (fused) |" in text
    png = md.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


@pytest.mark.parametrize("flags", [[], ["--two-calls"], ["--scheduler"]], ids=["one-call", "two-calls", "scheduler"])
def test_step_profile_names_every_part(flags):
    pytest.importorskip("transformers")
    two_calls = "--two-calls" in flags
    script = ROOT / "benchmarks" / "step_profile.py"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "tiny", "--steps", "3", *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("CPU:")
    assert (", a new lr every step" in out) == ("--scheduler" in flags)
    reached = ("C sums kernel", "C update kernel", "coefficient formula") if two_calls else ("one-call step", "C one-call kernel")
    for part in ("planning (plan_step)", "tensor gate", *reached, "recording statistics", "beta_summary_tensor()",
                 "AdamW fused step"):
        assert f"| {part}" in out or f"|   of which: {part}" in out, part
    left_out = ("one-call step", "C one-call kernel") if two_calls else ("C sums kernel", "C update kernel", "coefficient formula")
    assert not any(part in out for part in left_out)  # what this kind of step never reaches is not listed
    # every part was really reached: no part of the AM step reads 0 microseconds
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "us per step" not in line]
    assert all(float(r[2].strip().strip("*")) > 0 for r in rows if r[2].strip() and r[2].strip() != "---"), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_step_profile_on_cuda_refuses_without_a_device():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert "|" not in proc.stdout  # no table of CPU figures passed off as the GPU's


def test_step_profile_counts_the_host_ops_of_the_triton_path_in_the_interpreter():
    """``--kernels triton``: the CUDA path's host side on CPU tensors.  The op counts leave out what the
    interpreter runs inside a kernel (hundreds of torch calls per launch), so a kernel part counts only
    the few ops of its wrapper, and every top-level part plus the rest add up to the step's count."""
    pytest.importorskip("transformers")
    script = ROOT / "benchmarks" / "step_profile.py"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "tiny", "--steps", "1", "--kernels", "triton"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Triton kernels in Triton's interpreter" in out and "| torch ops per step |" in out
    cells = [[c.strip().strip("*").strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| ") and "---" not in line and "torch ops per step" not in line]
    ops = {name: int(count) for name, _, _, count in cells}
    for part in ("Triton sums kernel (interpreted)", "Triton update kernel (interpreted)"):
        assert 0 < ops[f"of which: {part}"] < 40, (part, out)
    assert not any(name.startswith("C ") or " C " in name for name in ops)
    names = list(ops)
    step_row = next(i for i, name in enumerate(names) if name.startswith("AM-AdamW step"))
    top_level = [name for name in names[:step_row] if not name.startswith("of which")]  # rest of step() included
    assert sum(ops[name] for name in top_level) == ops[names[step_row]] > 0, out


@pytest.mark.parametrize("flags", [[], ["--as-trainer"]], ids=["plain", "as-trainer"])
def test_step_ab_compares_two_checkouts_in_one_process(flags):
    """A/A: this checkout against itself (imported a second time as hf_am_before); no timing asserted."""
    pytest.importorskip("transformers")
    script = ROOT / "benchmarks" / "step_ab.py"
    proc = subprocess.run([sys.executable, str(script), "--before", str(ROOT), "--sizes", "tiny", "--rounds", "4", *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("CPU:") and "--before" in out  # the machine, the command
    assert ("--as-trainer`" in out) == bool(flags)
    row = next(line for line in out.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and all(float(c.split()[0]) > 0 for c in cells[1:4]), row
    bad = subprocess.run([sys.executable, str(script), "--before", str(ROOT / "docs")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "holds no hf_am package" in bad.stderr


def test_trainer_overhead_refuses_bf16_on_cpu():
    proc = _run("--bf16", timeout=120)
    assert proc.returncode == 2 and "--bf16 needs --device cuda" in proc.stderr, proc.stderr


def test_gpu_round_help_and_refusal_without_cuda(tmp_path):
    """The GPU round prints what it runs; where torch sees no CUDA device it exits 2 and writes nothing
    (instead of logging eight failed parts as a finished run)."""
    script = ROOT / "benchmarks" / "gpu_round.sh"
    env = dict(os.environ, PYTHON=sys.executable)
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0 and "OUT_DIR" in helped.stdout and "optimizer_overhead.py" in helped.stdout
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "usage" in bad.stderr
    _refuses_without_cuda(script, tmp_path / "round", env)


def _refuses_without_cuda(script, out, env):
    """A GPU script run where torch sees no CUDA device exits 2 before writing anything."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one")
    proc = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr
    assert not out.exists()


def test_gpu_variants_help_refusal_and_patches_that_apply(tmp_path):
    """The kernel variants waiting for a GPU: the script prints what it runs and refuses (exit 2, nothing
    written) without CUDA; every patch applies to this tree, so the prepared GPU run cannot find its
    variants stale (make a patch again from its branch when this fails)."""
    script = ROOT / "benchmarks" / "gpu_variants.sh"
    env = dict(os.environ, PYTHON=sys.executable)
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0 and "OUT_DIR" in helped.stdout and "gpu_variants/NAME.patch" in helped.stdout
    patches = sorted((ROOT / "benchmarks" / "gpu_variants").glob("*.patch"))
    assert patches
    for patch_file in patches:
        proc = subprocess.run(["patch", "--dry-run", "-s", "-p1", "-d", str(ROOT), "-i", str(patch_file)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (patch_file.name, proc.stdout + proc.stderr)
    _refuses_without_cuda(script, tmp_path / "variants", env)
