"""The layering CONTRIBUTING.md promises: imports run one way, and each kernel set meets the interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import hf_am
from hf_am.kernels import KernelSet, cpu, interface

PACKAGE = Path(hf_am.__file__).resolve().parent


def _hf_am_imports(path: Path):
    """The hf_am modules ``path`` imports, as dotted names (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if not node.module or node.level and not node.module else [target]
            out.update(n for n in names + [target] if n.startswith("hf_am"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hf_am"))
    return out


@pytest.mark.parametrize("path", sorted(PACKAGE.joinpath("kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_above_them(path):
    above = {m for m in _hf_am_imports(path) if not m.startswith("hf_am.kernels")}
    assert not above, f"{path.name} imports {above}: kernels must not depend on the optimizer layer"


@pytest.mark.parametrize(
    "path", sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "run.py")), ids=lambda p: p.name
)
def test_the_core_does_not_import_integrations(path):
    assert not {m for m in _hf_am_imports(path) if m.startswith("hf_am.integrations")}, path.name


def test_the_import_checker_sees_relative_imports():
    """A negative control: the checker finds what a core module really imports."""
    found = _hf_am_imports(PACKAGE / "planning.py")
    assert "hf_am.kernels" in found and "hf_am.sharding" in found


def test_the_c_kernel_set_meets_the_interface():
    assert isinstance(cpu, KernelSet)
    t = torch.zeros(3)
    assert cpu.decline([[t], [t]]) in (None, f"the CPU kernels are unavailable ({hf_am.kernels.cpu_build.build_error()})")
    assert "dtype torch.bfloat16" in cpu.decline([[t.bfloat16()], [t.bfloat16()]])
    strided = torch.zeros(3, 8)[:, ::2]
    assert "strided view, not dense" in cpu.decline([[strided], [strided]])
    transposed = torch.zeros(3, 4).t()  # dense in another order: the kernels walk it linearly
    assert "memory layout" in cpu.decline([[transposed], [transposed.contiguous()]])
    if hf_am.kernels.cpu_build.library() is not None:
        assert cpu.decline([[transposed], [torch.zeros(3, 4).t()]]) is None


def test_the_triton_kernel_set_meets_the_interface():
    from hf_am.kernels import triton as triton_set

    assert isinstance(triton_set, KernelSet)
    if not triton_set.available():
        assert "Triton or CUDA unavailable" in triton_set.decline([[torch.zeros(2)]])


def test_tensor_problem_names_the_device_and_the_dtype():
    assert interface.tensor_problem([[]], (torch.float32,), "cpu") == "no tensors"
    assert "mixed dtypes" in interface.tensor_problem([[torch.zeros(1), torch.zeros(1, dtype=torch.float64)]], (torch.float32, torch.float64), "cpu")
