"""The Triton kernel set's host side: the per-tensor scalar arrays a kernel reads and the per-tensor sums
it hands back.  Every torch op here is a launch and host time on a GPU, so these helpers hand over what
is already in the right form and do the rest in as few ops as they can, and that must not change what a
kernel reads.  Runs on CPU without Triton: the helpers are plain torch (the kernels themselves run in
Triton's interpreter, tests/battery/test_triton_interpreter.py, and on a GPU, tests/gpu/).
"""

from __future__ import annotations

import pytest
import torch

from hf_am.kernels import triton as triton_kernels

LIKE = torch.zeros(3)  # the device the kernel runs on (CPU here: the interpreter's case)


def test_a_float32_vector_on_the_device_is_handed_over_without_an_op():
    values = torch.tensor([0.5, -2.0, 3.0])
    out = triton_kernels._scalars(values, LIKE, 3)
    assert out is values  # no copy, no conversion: the kernel reads it as it is


@pytest.mark.parametrize(
    "values",
    [
        torch.tensor([0.1, -0.0, 1e-40, float("nan")], dtype=torch.float64),  # rounded once to float32
        torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16),
        torch.arange(8.0)[::2],  # a strided view: made contiguous
    ],
    ids=["float64", "bfloat16", "strided"],
)
def test_other_vectors_become_the_float32_values_a_kernel_reads(values):
    out = triton_kernels._scalars(values, LIKE, 4)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (4,)
    assert torch.equal(out.view(torch.int32), values.to(torch.float32).contiguous().view(torch.int32))  # bit for bit


@pytest.mark.parametrize("value", [0.3, 2, torch.tensor(0.3, dtype=torch.float64)], ids=["float", "int", "0-dim"])
def test_a_number_or_0dim_tensor_is_filled_in_rounded_to_float32(value):
    out = triton_kernels._scalars(value, LIKE, 5)
    assert out.dtype == torch.float32 and out.shape == (5,)
    assert torch.equal(out, torch.full((5,), float(value), dtype=torch.float64).float())


def test_a_0dim_tensor_on_the_device_is_broadcast_to_n():
    assert torch.equal(triton_kernels._scalars(torch.tensor(1.5, dtype=torch.float64), LIKE, 3), torch.full((3,), 1.5))


@pytest.mark.parametrize(
    "values,match",
    [
        (torch.zeros(2), r"expected 4 values on cpu, got shape \(2,\)"),  # the kernel would read 2 past the end
        (torch.zeros(2, 2), r"expected 4 values on cpu, got shape \(2, 2\)"),
        (torch.zeros(4, device="meta"), r"a tensor on meta of shape \(4,\) cannot be read on cpu"),
    ],
    ids=["short", "2-d", "other-device"],
)
def test_scalars_that_do_not_fit_raise_before_a_kernel_reads_them(values, match):
    with pytest.raises(ValueError, match=match):
        triton_kernels._scalars(values, LIKE, 4)


@pytest.mark.parametrize("numels", [(1,), (5, 0, 3 * triton_kernels.CHUNK + 7, 1, triton_kernels.CHUNK)],
                         ids=["one-program", "many"])
def test_per_tensor_sums_are_the_float64_sums_of_each_tensors_programs(numels):
    """Each tensor's sum is a difference of a float64 running sum over the programs, rounded to float32
    once; an empty tensor still owns one program (whose partial sum the kernel writes as zeros)."""
    blocks = triton_kernels._Blocks(numels, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    magnitudes = 10.0 ** torch.randint(-3, 4, (blocks.n_programs, 1), generator=gen)
    partial = torch.randn(blocks.n_programs, 3, generator=gen) * magnitudes
    running = torch.cat((torch.zeros(1, 3, dtype=torch.float64), partial.double().cumsum(0)))
    expected, first = [], 0
    for n in numels:
        programs = max(1, -(-n // triton_kernels.CHUNK))
        expected.append((running[first + programs] - running[first]).float())
        first += programs
    out = blocks.per_tensor(partial)
    assert out.dtype == torch.float32 and out.shape == (len(numels), 3)
    assert torch.equal(out, torch.stack(expected))
    # and within float32 rounding of the plain sums of each tensor's programs
    sums, first = [], 0
    for n in numels:
        programs = max(1, -(-n // triton_kernels.CHUNK))
        sums.append(partial[first : first + programs].double().sum(0))
        first += programs
    torch.testing.assert_close(out.double(), torch.stack(sums), rtol=1e-6, atol=1e-6)
