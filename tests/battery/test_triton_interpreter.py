"""The Triton kernels (the default path on CUDA) checked on this CPU machine, in Triton's interpreter.

Needs Triton: torch's CUDA builds bring it; on CPU-only machines ``scripts/setup.sh test``
installs it into ``.triton_interpreter/``, which only this test's subprocess imports from.

``tests/test_cuda.py`` runs them compiled on a GPU; here every launch runs in
Triton's interpreter on CPU tensors (``tests/battery/triton_interpret.py``), so CI
catches a wrong kernel without a GPU: float32 equals the per-tensor reference to
1e-6; bfloat16 and float16 stay within a fraction of the distance the run moved the
parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "triton_interpret.py"
# Where ``scripts/setup.sh test`` puts Triton on machines whose torch has none (CPU builds).
TESTS = Path(__file__).resolve().parents[1]
TRITON_DIR = Path(__file__).resolve().parents[2] / ".triton_interpreter"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if TRITON_DIR.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON_DIR), str(TESTS), env.get("PYTHONPATH")]))
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_every_case_ran_through_the_triton_kernels(interpreted):
    cases = {k: r for k, r in interpreted.items() if k not in ("gate", "merged")}
    assert len(cases) == 18  # 2 optimizers x 3 dtypes x 3 variants
    assert all(r["ran"] for r in cases.values()), {k for k, r in cases.items() if not r["ran"]}


@pytest.mark.parametrize("case", ["dtype", "size"])
def test_the_gate_stops_mismatched_state_before_a_triton_launch(interpreted, case):
    """On CUDA a state tensor of another dtype or size would be an illegal memory access; here the
    same kernels (interpreted) are never launched, the step raises naming the tensor, nothing moves."""
    r = interpreted["gate"][case]
    assert r["error"] and "state 'exp_a" in r["error"] and "Nothing was changed" in r["error"], r
    assert not r["launched"] and r["unchanged"], r


@pytest.mark.parametrize("name", ["am_adamw", "am_sgd"])
@pytest.mark.parametrize("variant", ["model", "tensor-restart-wd", "group-betamin-tensorlr"])
def test_float32_kernels_equal_the_reference(interpreted, name, variant):
    r = interpreted[f"{name}-float32-{variant}"]
    assert r["moved"] > 0.01, r  # the run trained, so equal parameters mean equal updates
    assert r["param_diff"] < 1e-6, r
    assert r["beta_diff"] < 1e-5, r


@pytest.mark.parametrize("name", ["am_adamw", "am_sgd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["model", "tensor-restart-wd", "group-betamin-tensorlr"])
def test_low_precision_kernels_track_the_reference(interpreted, name, dtype, variant):
    """Both paths compute in float32 and store in the parameter dtype; they differ by a few
    roundings of the stored state (a kernel that updated with the rounded second moment
    instead of the new one was off by ten times the distance trained in float16)."""
    r = interpreted[f"{name}-{dtype}-{variant}"]
    assert r["moved"] > 0.01, r
    assert r["param_diff"] < 0.15 * r["moved"], r
    assert r["beta_diff"] < 0.02, r


@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_groups_that_differ_only_in_weight_decay_take_one_launch_per_phase(interpreted, scope):
    """The Trainer's two groups: one sums launch per step instead of two, and the same bits as one launch
    per group (parameters, every state tensor, the callback's summary)."""
    r = interpreted["merged"][scope]
    assert r["sums_launches_per_step"] == [1, 2], r
    assert r["bits_equal"] and r["summary_equal"], r
