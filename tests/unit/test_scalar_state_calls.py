"""One-element state stored in one C call (``am_store_scalars``, hf_am/csrc/am_cpu_kernels.c; wrapper
:func:`hf_am.kernels.cpu.store_scalars`), and the remembered check in front of it and of the gate.

:func:`hf_am.statistics.record_step` writes about five scalars per parameter every step; torch copies
them one dispatch at a time.  Where the C kernels stepped every group, they go through this call.  What it
must keep: the bits torch's ops give (a copy rounds once to the destination's dtype; a count plus its
increment is added in float64), values formed before anything is stored (destinations that share memory),
and no memory handed to C that is not a plain one-element float32/float64 CPU tensor inside its storage,
checked again whenever an object, its address or its dtype changed (a declined call does nothing, and the
torch ops run).
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import hf_am
from hf_am import statistics
from hf_am.coefficient import StepCoefficients
from hf_am.kernels import cpu, cpu_build
from hf_am.planning import plan_step
from hf_am.state import APPLIED, BETA, FALLBACKS, PROD, RESTARTS

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="needs the C kernels (a C compiler)")

CORNERS = [0.0, -0.0, 1.0, 0.1, 1e-45, 3e38, 4e38, -1e300, 1e-310, math.inf, -math.inf, math.nan, 2.0**24 + 1, 0.3]


def _torch_store(destinations, values, adds):
    """The definition: values formed first (count + increment in float64), then one copy each."""
    formed = [float(d) + float(v) if a else float(v) for d, v, a in zip(destinations, values.tolist(), adds)]
    for d, f in zip(destinations, formed):
        d.copy_(torch.tensor(f, dtype=torch.float64))


def _bits(t: torch.Tensor) -> int:
    view = t.detach().reshape(1).view(torch.int64 if t.dtype == torch.float64 else torch.int32)
    return int(view.item())


def _scalars(gen: torch.Generator, n: int):
    dtypes = [torch.float32 if b else torch.float64 for b in torch.rand(n, generator=gen).lt(0.6).tolist()]
    shapes = [() if b else (1,) for b in torch.rand(n, generator=gen).lt(0.7).tolist()]
    start = [CORNERS[i] for i in torch.randint(0, len(CORNERS), (n,), generator=gen).tolist()]
    return [torch.tensor(v, dtype=d).reshape(s) for v, d, s in zip(start, dtypes, shapes)]


@pytest.mark.parametrize("n", [1, 7, 105])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_store_has_the_bits_of_torch_copies(n, seed):
    gen = torch.Generator().manual_seed(seed * 1000 + n)
    ours, theirs = _scalars(gen, n), None
    theirs = [t.clone() for t in ours]
    values = torch.tensor([CORNERS[i] for i in torch.randint(0, len(CORNERS), (n,), generator=gen).tolist()], dtype=torch.float64)
    adds = tuple(torch.randint(0, 2, (n,), generator=gen).tolist())
    _torch_store(theirs, values.clone(), adds)
    assert cpu.store_scalars(ours, values.clone(), adds) is True
    assert [_bits(t) for t in ours] == [_bits(t) for t in theirs]
    # a second store into the same objects takes the remembered check and still writes the values
    values2 = values.flip(0).contiguous()
    _torch_store(theirs, values2.clone(), adds)
    assert cpu.store_scalars(ours, values2.clone(), adds) is True
    assert [_bits(t) for t in ours] == [_bits(t) for t in theirs]


def test_values_are_formed_before_anything_is_stored():
    """One count listed twice (two destinations, one memory): both add to the value it held, as the torch
    ops (stack, add, copy) give; a loop that stored as it went would add twice."""
    count = torch.tensor(3.0)
    view = count.view(())  # another object over the same memory
    assert cpu.store_scalars([count, view], torch.tensor([1.0, 1.0], dtype=torch.float64), (1, 1)) is True
    assert float(count) == 4.0


def _negated():
    return torch._neg_view(torch.tensor(2.0))


DECLINED = {
    "float16": lambda: torch.tensor(1.0, dtype=torch.float16),
    "bfloat16": lambda: torch.tensor(1.0, dtype=torch.bfloat16),
    "int32": lambda: torch.tensor(1, dtype=torch.int32),
    "two elements": lambda: torch.zeros(2),
    "no element": lambda: torch.zeros(0),
    "negated view": _negated,
    "a Parameter (a subclass)": lambda: torch.nn.Parameter(torch.tensor(1.0), requires_grad=False),
    "meta device": lambda: torch.zeros((), device="meta"),
    "storage freed": lambda: _freed(),
}


def _freed():
    t = torch.tensor(5.0)
    t.untyped_storage().resize_(0)
    return t


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_store_declines_what_c_must_not_touch(case):
    good = [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64)]
    bad = DECLINED[case]()
    before = [_bits(t) for t in good]
    assert cpu.store_scalars([*good, bad], torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64), (0, 0, 0)) is False
    assert [_bits(t) for t in good] == before, "a declined store changed a destination"


def test_strided_one_element_view_inside_storage_is_taken():
    """A one-element view at an offset (a state loaded from a flat buffer) is plain memory: taken."""
    buffer = torch.zeros(8)
    t = buffer[5:6]
    assert cpu.store_scalars([t], torch.tensor([2.5], dtype=torch.float64), (0,)) is True
    assert buffer.tolist() == [0, 0, 0, 0, 0, 2.5, 0, 0]


def test_changes_under_a_remembered_object_are_checked_again():
    t, u = torch.tensor(1.0), torch.tensor(2.0)
    assert cpu.store_scalars([t, u], torch.tensor([3.0, 4.0], dtype=torch.float64), (0, 0)) is True
    t.data = torch.tensor(0.0, dtype=torch.float64)  # same object, other memory and dtype
    assert cpu.store_scalars([t, u], torch.tensor([1 / 3, 5.0], dtype=torch.float64), (0, 0)) is True
    assert t.dtype == torch.float64 and t.item() == 1 / 3 and u.item() == 5.0
    t.data = t.view(torch.int64)  # same object, same address, another dtype: declined
    assert cpu.store_scalars([t, u], torch.tensor([1.0, 6.0], dtype=torch.float64), (0, 0)) is False
    assert u.item() == 5.0
    u.untyped_storage().resize_(0)  # freed under a remembered object
    assert cpu.store_scalars([torch.tensor(0.0), u], torch.tensor([1.0, 6.0], dtype=torch.float64), (0, 0)) is False


@pytest.mark.parametrize("values, adds", [
    (torch.zeros(2, dtype=torch.float32), (0, 0)),
    (torch.zeros(3, dtype=torch.float64), (0, 0)),
    (torch.zeros(2, dtype=torch.float64), (0,)),
    (torch.zeros(4, dtype=torch.float64)[::2], (0, 0)),
    (torch.zeros(2, 1, dtype=torch.float64), (0, 0)),
])  # fmt: skip
def test_store_refuses_values_that_do_not_fit(values, adds):
    dest = [torch.tensor(1.0), torch.tensor(2.0)]
    with pytest.raises(ValueError, match="store_scalars"):
        cpu.store_scalars(dest, values, adds)
    assert [t.item() for t in dest] == [1.0, 2.0]


def test_c_entry_points_refuse_bad_arguments_before_writing():
    lib = cpu_build.library()
    t = torch.tensor(1.0)
    values = torch.tensor([9.0], dtype=torch.float64)
    addresses = (ctypes.c_void_p * 1)(t.data_ptr())
    null = (ctypes.c_void_p * 1)(None)
    flags, bad_flags = (ctypes.c_ubyte * 1)(0), (ctypes.c_ubyte * 1)(2)
    adds, bad_adds = (ctypes.c_ubyte * 1)(0), (ctypes.c_ubyte * 1)(7)
    assert lib.am_store_scalars(1, null, flags, adds, values.data_ptr()) == 2
    assert lib.am_store_scalars(1, addresses, bad_flags, adds, values.data_ptr()) == 2
    assert lib.am_store_scalars(1, addresses, flags, bad_adds, values.data_ptr()) == 2
    assert lib.am_store_scalars(-1, addresses, flags, adds, values.data_ptr()) == 2
    assert lib.am_store_scalars(1, addresses, flags, adds, None) == 2
    assert t.item() == 1.0
    assert lib.am_store_scalars(1, addresses, flags, adds, values.data_ptr()) == 0 and t.item() == 9.0


# ----------------------------------------------------------------- through the optimizer
def _optimizer(dtype, restart_threshold, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    groups = [dict(params=[p for p in model.parameters() if p.ndim > 1], weight_decay=0.1),
              dict(params=[p for p in model.parameters() if p.ndim == 1], weight_decay=0.0)]  # fmt: skip
    opt = hf_am.AMAdamW(groups, lr=1e-2, restart_threshold=restart_threshold)
    for _ in range(3):
        opt.step()
    return opt


def _scalar_bits(opt):
    keys = ("step", PROD, BETA, APPLIED, FALLBACKS, RESTARTS)
    return [(key, _bits(opt.state[p][key])) for g in opt.param_groups for p in g["params"] for key in keys]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("restart_threshold", [None, 0.5])
def test_record_step_stores_the_bits_of_the_torch_ops(dtype, restart_threshold):
    """record_step on the C store and on torch's ops, from equal state with equal coefficients: equal bits
    in every one-element state entry, and equal summaries."""
    c_side, torch_side = _optimizer(dtype, restart_threshold), _optimizer(dtype, restart_threshold)
    assert _scalar_bits(c_side) == _scalar_bits(torch_side)
    gen = torch.Generator().manual_seed(3)
    for trial in range(4):
        plans_c, layout = plan_step(c_side)
        plans_t, _ = plan_step(torch_side)
        for plan in plans_t:
            plan.kernels = None  # as if another path had stepped the groups: torch's ops record
        n = layout.n_scopes
        corners = torch.tensor([0.0, 0.9, math.nan, 1.0, 1e-30], dtype=torch.float64)
        rows = [corners[torch.randint(0, 5, (n,), generator=gen)] if trial % 2 else torch.rand(n, generator=gen, dtype=torch.float64)
                for _ in range(3)]  # fmt: skip
        flags = [torch.randint(0, 2, (n,), generator=gen).double() for _ in range(2)]
        coefficients = StepCoefficients(rows[0], rows[1], rows[2], flags[0] if restart_threshold else flags[0] * 0, flags[1])
        states = [c_side.state[p] for plan in plans_c for p in plan.params]
        states_t = [torch_side.state[p] for plan in plans_t for p in plan.params]
        acc = states[0][PROD].dtype
        prods, steps = torch.rand(len(states), generator=gen).to(acc), torch.arange(len(states), dtype=acc) + trial
        writes_c = [statistics.ScalarWrite(states, PROD, prods), statistics.ScalarWrite(states, "step", steps)]
        writes_t = [statistics.ScalarWrite(states_t, PROD, prods), statistics.ScalarWrite(states_t, "step", steps)]
        stored_by_c = statistics.record_step(c_side, plans_c, coefficients, layout.device, None, writes_c)
        stored_by_torch = statistics.record_step(torch_side, plans_t, coefficients, layout.device, None, writes_t)
        assert stored_by_c is cpu and stored_by_torch is None, "the comparison must be of the C store and torch's ops"
        assert _scalar_bits(c_side) == _scalar_bits(torch_side)
        summary_c, summary_t = c_side.beta_summary_tensor(), torch_side.beta_summary_tensor()
        assert [_bits(x) for x in summary_c] == [_bits(x) for x in summary_t]


def test_other_paths_and_loaded_state_record_with_torch_ops():
    """fused=False means no compiled code for that optimizer: its statistics are stored by torch's ops; the
    C kernels' groups store theirs in C, before and after load_state_dict."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.randn_like(p)

    def stores_with(opt):
        plans, layout = plan_step(opt)
        return statistics._scalar_kernels(plans, layout.device)

    foreach = hf_am.AMAdamW(params, fused=False)
    foreach.step()
    assert stores_with(foreach) is None
    fused = hf_am.AMAdamW(params)
    fused.step()
    assert stores_with(fused) is cpu
    fused.load_state_dict(fused.state_dict())
    assert stores_with(fused) is cpu
    summary = fused.beta_summary_tensor()  # from the loaded state
    assert summary.shape == (8,) and not torch.isnan(summary).all()


# ----------------------------------------------------------------- the remembered check
def test_a_remembered_check_runs_again_exactly_when_objects_addresses_or_dtypes_change():
    from hf_am.kernels.interface import remembered_check

    calls = []

    def check(tensors, addresses, dtypes):
        calls.append(addresses)
        return ("ok", len(tensors))

    a, b = torch.tensor(1.0), torch.tensor(2.0)
    assert remembered_check("test", [a, b], check) == ("ok", 2) and len(calls) == 1
    assert remembered_check("test", [a, b], check) == ("ok", 2) and len(calls) == 1  # remembered
    assert remembered_check("another kind", [a, b], check) and len(calls) == 2  # kinds are kept apart
    remembered_check("test", [a, b.view(())], check)  # another object at the same address
    assert len(calls) == 3
    b.data = torch.tensor(2.0)  # the same object at another address
    remembered_check("test", [a, b], check)
    assert len(calls) == 4
    a.data = a.view(torch.int32)  # the same object and address, another dtype
    remembered_check("test", [a, b], check)
    assert len(calls) == 5
    declined = []
    remembered_check("declines", [a], lambda t, ad, d: declined.append(1))  # None: not remembered
    remembered_check("declines", [a], lambda t, ad, d: declined.append(1))
    assert declined == [1, 1]
    assert remembered_check("test", [a, 3.0], check) is None  # no tensor: no address, nothing checked
    assert len(calls) == 5


def test_the_bounded_cache_forgets_the_least_recently_used_and_stays_bounded_under_threads():
    """One LRU class holds the remembered checks and the C kernels' ctypes arrays: a wrong eviction order
    would drop the entries a training loop reuses every step, a missing bound would grow without end in a
    process that builds many optimizers, and a lost lock would break the bound under threads."""
    import threading

    from hf_am.kernels.interface import BoundedCache

    cache = BoundedCache(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # now the most recently used: "b" goes first
    cache.put("d", "D")
    assert len(cache) == 3 and cache.get("b") is None and [cache.get(k) for k in "acd"] == ["A", "C", "D"]
    cache.put("c", "C2")  # a new value for a key replaces it and makes it the most recent
    cache.put("e", "E")
    assert cache.get("a") is None and cache.get("c") == "C2"
    with pytest.raises(ValueError, match="does not store None"):
        cache.put("x", None)
    with pytest.raises(ValueError, match="max_entries must be at least 1, got 0"):
        BoundedCache(0)

    shared = BoundedCache(8)
    workers = [threading.Thread(target=lambda n=n: [shared.put((n, i), i + 1) for i in range(2000)]) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(shared) == 8

    # The kernels' arrays: equal values give the same ctypes array (built once), and it holds the values.
    first = cpu._array(ctypes.c_int64, (3, 1, 4))
    assert cpu._array(ctypes.c_int64, (3, 1, 4)) is first and list(first) == [3, 1, 4]
    assert list(cpu._array(ctypes.c_int64, ())) == []


def test_a_remembered_check_evicted_by_many_others_runs_again():
    from hf_am.kernels import interface

    calls = []
    a = torch.tensor(1.0)
    interface.remembered_check("evict", [a], lambda t, ad, d: calls.append(1) or True)
    others = [torch.tensor(float(i)) for i in range(interface._REMEMBERED.max_entries)]
    for t in others:  # as many other lists as the cache holds: the first falls out
        interface.remembered_check("evict", [t], lambda t, ad, d: True)
    interface.remembered_check("evict", [a], lambda t, ad, d: calls.append(1) or True)
    assert calls == [1, 1]


def test_the_gate_checks_one_element_state_freed_under_an_accepted_object():
    """The gate accepts one-element state by identity once the walk has seen it; a storage freed under such
    an object afterwards is found the next step (before anything changes), on every path."""
    for options in ({}, dict(foreach=True), dict(foreach=False)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = hf_am.AMAdamW(params, **options)
        opt.step()
        opt.step()  # accepted in bulk, the storage check remembered
        before = [p.detach().clone() for p in params]
        opt.state[params[1]][APPLIED].untyped_storage().resize_(0)
        with pytest.raises(RuntimeError, match=r"state 'am_applied' has a storage of 0 bytes.*Nothing was changed"):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))


# ----------------------------------------------------------------- autograd sees the writes
@pytest.mark.parametrize("name", ["am_adamw", "am_sgd"])
@pytest.mark.parametrize("options", [{}, dict(foreach=True)], ids=["c_kernels", "foreach"])
def test_a_graph_that_saved_a_parameter_refuses_to_backward_after_a_step(name, options):
    """torch's in-place ops move a tensor's version counter, so a graph that saved a parameter refuses to
    backward through it after the optimizer changed it; the compiled kernels write raw memory and must
    say so (hf_am.kernels.interface.mark_written), or the backward would silently use the new value."""
    cls = hf_am.AMAdamW if name == "am_adamw" else hf_am.AMSGD
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = cls([p], lr=1e-2, **options)
    (p * p).sum().backward()
    opt.step()  # state exists
    before = p._version
    saved = (p * p).sum()  # saves p for its backward
    opt.step()
    assert p._version > before
    assert opt.state[p]["step"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
