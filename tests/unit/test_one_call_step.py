"""AM-AdamW's whole step in one C call (``am_adamw_step`` in hf_am/csrc/am_cpu_kernels.c, taken where
``AMOptimizer._whole_step_in_one_call`` allows it) against the two-call step it replaces: the same bits in
parameters, every state entry and the statistics, over a table of configurations that reach every branch
of the C code between the passes (restart, clip, per-scope hyperparameters, merged groups, changing and
zero learning rates, non-finite gradients, parameters without gradients), for float32 and float64, with
tensors stepped whole on one thread ("tasks") and tensors that take the shared passes side by side; the
cases that need Python between the passes keep the two calls; and bad arguments are refused before the C
code reads them."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import hf_am
from hf_am.kernels import cpu, cpu_build

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="needs the C kernels (a C compiler)")

_SHAPES = [(64, 33), (33,), (70000,), (5, 3), (1,), (300, 20)]  # one tensor of two 64K chunks


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).contiguous().view(torch.int64)  # NaN == NaN, and -0.0 != 0.0


def _one_group(ps):
    return ps


def _trainer(ps):  # the Trainer's two groups: merged into one call
    return [dict(params=[p for p in ps if p.dim() >= 2], weight_decay=0.1),
            dict(params=[p for p in ps if p.dim() < 2], weight_decay=0.0)]  # fmt: skip


def _per_scope_hyper(ps):  # same lr, betas, eps (one call), other lam and beta_min: a (4, n) hyper table
    return [dict(params=ps[:3], lam=0.3, beta_min=0.2), dict(params=ps[3:], weight_decay=0.0)]


def _nan_at(step, index, value=math.nan):
    def damage(t, grads):
        if t == step:
            grads[index].view(-1)[0] = value
    return damage


def _drop_at(step, index):
    def damage(t, grads):
        if t == step:
            grads[index] = None
    return damage


def _frozen(index):
    def damage(t, grads):
        grads[index] = None
    return damage


LR_CHANGES = [1e-2, 5e-3, 0.0, 0, 1e-1, 2e-2]  # a change (eta' != eta), zero, an int zero
CASES = {
    "default": dict(),
    "restart": dict(kw=dict(restart_threshold=0.6)),
    "clip-no-pull": dict(kw=dict(lam=0.0, beta_min=0.5)),
    "strong-pull-decay": dict(kw=dict(lam=2.0, weight_decay=0.3)),
    "trainer-groups": dict(groups=_trainer),
    "per-scope-hyper": dict(groups=_per_scope_hyper, kw=dict(restart_threshold=0.4)),
    "lr-schedule": dict(lrs=LR_CHANGES),
    "lr-schedule-trainer-restart": dict(groups=_trainer, lrs=LR_CHANGES, kw=dict(restart_threshold=0.5)),
    "nan-gradient": dict(damage=_nan_at(2, 2)),
    "inf-gradient-restart": dict(damage=_nan_at(3, 0, math.inf), kw=dict(restart_threshold=0.5)),
    "missing-gradient": dict(damage=_drop_at(2, 1), groups=_trainer),
    "frozen-parameter": dict(damage=_frozen(3)),
    "beta2-eps": dict(kw=dict(betas=(0.8, 0.95), eps=1e-3)),
    "maximize": dict(kw=dict(maximize=True)),
}


def _run(case, dtype, one_call, threads=None, steps=6, shapes=_SHAPES):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    kw = dict(lr=1e-2, **case.get("kw", {}))
    opt = hf_am.AMAdamW(case.get("groups", _one_group)(params), **kw)
    opt.one_call_step = one_call
    damage, lrs = case.get("damage"), case.get("lrs")
    calls = []
    real = cpu.adamw_step

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    cpu.adamw_step = counting
    old_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for t in range(steps):
            grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
            if damage:
                damage(t, grads)
            for p, g in zip(params, grads):
                p.grad = g
            if lrs:
                for group in opt.param_groups:
                    group["lr"] = lrs[t]
            opt.step()
    finally:
        cpu.adamw_step = real
        torch.set_num_threads(old_threads)
    state = [(i, k, v.clone()) for i, p in enumerate(params) for k, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return params, state, opt, len(calls)


def _assert_same_bits(a, b):
    params, state, opt, _ = a
    params_ref, state_ref, opt_ref, _ = b
    for p, q in zip(params, params_ref):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
    assert [(i, k) for i, k, _ in state] == [(i, k) for i, k, _ in state_ref]
    for (i, k, u), (_, _, v) in zip(state, state_ref):
        assert u.dtype == v.dtype and torch.equal(_bits(u), _bits(v)), (i, k, u, v)
    assert torch.equal(_bits(opt.beta_summary_tensor()), _bits(opt_ref.beta_summary_tensor()))
    assert torch.equal(_bits(opt.betas_per_scope()), _bits(opt_ref.betas_per_scope()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_one_call_gives_the_bits_of_the_two_calls(name, dtype):
    case = CASES[name]
    one = _run(case, dtype, one_call=True)
    two = _run(case, dtype, one_call=False)
    assert one[3] == 6 and two[3] == 0  # the one call really ran, every step; the reference never
    _assert_same_bits(one, two)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_same_bits_for_other_thread_counts(threads):
    case = CASES["lr-schedule-trainer-restart"]
    _assert_same_bits(_run(case, torch.float32, True, threads=threads), _run(case, torch.float32, False, threads=2))


def _lr_tensor(ps):
    return [dict(params=ps, lr=torch.tensor(1e-2))]


def _two_rates(ps):
    return [dict(params=ps[:3]), dict(params=ps[3:], lr=3e-3)]


@pytest.mark.parametrize(
    "kw,groups",
    [(dict(scope="group"), _one_group), (dict(scope="model"), _one_group), (dict(scope="model", loss_estimate="exact"), _one_group),
     (dict(fused=False), _one_group), (dict(), _lr_tensor), (dict(), _two_rates)],
    ids=["scope-group", "scope-model", "exact-loss", "not-fused", "tensor-lr", "two-calls-of-phase-one"],
)
def test_steps_that_need_python_between_the_passes_keep_two_calls(kw, groups):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in _SHAPES]
    opt = hf_am.AMAdamW(groups(params), lr=1e-2, **kw)
    calls = []
    real = cpu.adamw_step
    cpu.adamw_step = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for _ in range(2):
            for p in opt.param_groups[0]["params"] + [q for g in opt.param_groups[1:] for q in g["params"]]:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step((lambda: torch.tensor(1.0)) if kw.get("loss_estimate") == "exact" else None)
    finally:
        cpu.adamw_step = real
    assert calls == []


def test_a_prevented_one_call_leaves_no_state_behind():
    p = torch.randn(10, requires_grad=True)
    p.grad = torch.randn(10)
    before = p.detach().clone()
    opt = hf_am.AMAdamW([p], lr=1e-2)
    real = cpu.adamw_step

    def refuse(*a, **k):  # what the wrapper raises when the C call returns a failure status
        raise RuntimeError("hf_am CPU kernel am_adamw_step failed (status 1: out of memory); nothing was changed")

    cpu.adamw_step = refuse
    try:
        with pytest.raises(RuntimeError, match="am_adamw_step failed"):
            opt.step()
    finally:
        cpu.adamw_step = real
    assert torch.equal(p.detach(), before) and len(opt.state) == 0  # the first step left nothing
    opt.step()  # and the next one starts as a first step
    assert float(opt.state[p]["step"]) == 1.0


def _direct_args(n=2, n_scopes=2, **override):
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(5, generator=gen) for _ in range(n)] for _ in range(4)]
    ones = torch.ones(n, dtype=torch.float64)
    args = dict(beta2=0.999, eps_scaled=ones * 1e-8, d_scale=ones * 0, bias2_sqrt=ones * 0.03, prods=ones, eta=ones * 1e-2,
                eta_b=ones * 2e-2, decay=ones, neg_lr=-1e-2, has_restarts=False, scope_ids=list(range(n)), n_scopes=n_scopes,
                hyper=torch.tensor([[0.1], [0.0], [0.9], [math.nan]], dtype=torch.float64), has_threshold=False)
    args.update(override)
    return lists, args


@pytest.mark.parametrize(
    "override,match",
    [(dict(scope_ids=[0, 2]), r"scope_ids must hold 2 distinct scope indices in \[0, 2\)"),
     (dict(scope_ids=[-1, 0]), "scope_ids"),
     (dict(scope_ids=[0]), "scope_ids must hold 2"),
     (dict(scope_ids=[1, 1]), r"\(1 distinct\)"),
     (dict(hyper=torch.zeros(4, 3, dtype=torch.float64)), r"hyper must be a contiguous \(4, 1\) or \(4, 2\)"),
     (dict(hyper=torch.zeros(4, 1)), "float64"),
     (dict(hyper=torch.zeros(4, 2, dtype=torch.float64)[:, :1]), "contiguous")],
    ids=["scope-too-large", "scope-negative", "too-few-scopes", "scope-repeated", "hyper-columns", "hyper-float32", "hyper-strided"],
)
def test_bad_arguments_are_refused_before_the_c_code_reads_them(override, match):
    lists, args = _direct_args(**override)
    before = [t.clone() for lst in lists for t in lst]
    with pytest.raises(ValueError, match=match):
        cpu.adamw_step(*lists, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for lst in lists for t in lst]))


def test_lists_of_other_lengths_or_dtypes_are_refused():
    lists, args = _direct_args()
    with pytest.raises(ValueError, match=r"lengths \[2, 1, 2, 2\]"):
        cpu.adamw_step(lists[0], lists[1][:1], lists[2], lists[3], **args)
    halves = [[t.half() for t in lst] for lst in lists]
    with pytest.raises(ValueError, match="torch.float16"):
        cpu.adamw_step(*halves, **args)


def test_the_c_entry_point_checks_its_own_arguments_and_touches_nothing_when_it_refuses():
    """The wrapper's checks again, in C (a caller of the library that skips the wrapper): status 2."""
    lib = cpu_build.library()
    lists, _ = _direct_args()
    before = [t.clone() for lst in lists for t in lst]
    n = 2
    i64 = (ctypes.c_int64 * n)(5, 5)
    ptrs = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in lst]) for lst in lists]
    doubles = torch.ones(n, dtype=torch.float64)
    hyper = torch.tensor([[0.1], [0.0], [0.9], [math.nan]], dtype=torch.float64)
    coef, prods, sums = torch.zeros(5, n, dtype=torch.float64), torch.empty(n), torch.zeros(n, 3, dtype=torch.float64)

    def call(bits=32, count=n, scopes=(0, 1), n_scopes=n, hyper_len=1):
        d = doubles.data_ptr()
        return lib.am_adamw_step(bits, 2, count, i64, *ptrs, 0.999, d, d, d, d, d, d, d, -1e-2, 0,
                                 (ctypes.c_int64 * n)(*scopes), n_scopes, hyper.data_ptr(), hyper_len, 0,
                                 coef.data_ptr(), prods.data_ptr(), sums.data_ptr())

    assert call(bits=16) == 2
    assert call(count=-1) == 2
    assert call(scopes=(0, 2)) == 2
    assert call(scopes=(-1, 0)) == 2
    assert call(scopes=(1, 1)) == 2  # two tensors of one scope: the tasks would share a column
    assert call(hyper_len=3) == 2
    assert call(n_scopes=-1) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, [t for lst in lists for t in lst]))
    assert call() == 0  # and the same arguments within range step
    assert not torch.equal(before[0], lists[0][0])


def _tasks(shapes, dtype, threads):
    """Which of these tensors the one call steps whole on one thread (its "tasks", am_adamw_step_tasks)."""
    n = len(shapes)
    numel = (ctypes.c_int64 * n)(*[math.prod(s) for s in shapes])
    marks = (ctypes.c_ubyte * n)()
    count = cpu_build.library().am_adamw_step_tasks(64 if dtype == torch.float64 else 32, threads, n, numel, marks)
    assert count == sum(marks)
    return list(marks)


# A three-chunk tensor that is a task (three, so that the order its chunk sums are added in shows in the
# bits) beside a 33-chunk one that takes the two shared passes; sixteen three-chunk tasks and nothing else;
# the table's shapes (tasks and the shared passes, one-chunk tasks).
_MIXED = [(140000,), (33,), (3000, 700), (64, 33), (1,)]
_ALL_TASKS = [(140000,)] * 15 + [(131073,)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shapes,expected", [(_MIXED, [1, 1, 0, 1, 1]), (_ALL_TASKS, [1] * 16), (_SHAPES, [1, 1, 0, 1, 1, 1])],
                         ids=["mixed", "all-tasks", "table"])
def test_tensors_stepped_whole_on_one_thread_give_the_bits_of_the_two_calls(shapes, expected, dtype, threads):
    """The tasks sum their chunks into the slots the shared pass uses and add them in the same order, so
    the bits cannot depend on which path a tensor takes or which thread takes it.  The default case: its
    coefficients are not clipped, so a last bit of a sum reaches the float64 parameters (adding a task's
    chunk sums last to first fails here)."""
    assert _tasks(shapes, dtype, threads) == expected
    case = CASES["default"]
    one = _run(case, dtype, True, threads=threads, steps=3, shapes=shapes)
    two = _run(case, dtype, False, threads=threads, steps=3, shapes=shapes)
    assert one[3] == 3
    _assert_same_bits(one, two)


def test_the_task_rule():
    """At most 8 MB per array (2M float32 elements), and at most 1 / (4 x threads) of the step's elements,
    so that the threads finish together; a bad argument writes nothing and returns -1."""
    assert _tasks([(2 << 20,)] * 16, torch.float32, 2) == [1] * 16
    assert _tasks([((2 << 20) + 1,)] * 16, torch.float32, 2) == [0] * 16
    assert _tasks([(2 << 20,)] * 16, torch.float64, 2) == [0] * 16  # 16 MB of float64
    assert _tasks([(100,)] * 7 + [(1,)], torch.float32, 2) == [0] * 7 + [1]  # 100 > 701 / 8
    assert _tasks([(100,)] * 8, torch.float32, 2) == [1] * 8
    assert _tasks([(100,)] * 8, torch.float32, 3) == [0] * 8
    lib = cpu_build.library()
    marks = (ctypes.c_ubyte * 2)(7, 7)
    assert lib.am_adamw_step_tasks(16, 2, 2, (ctypes.c_int64 * 2)(1, 1), marks) == -1
    assert lib.am_adamw_step_tasks(32, 2, 2, (ctypes.c_int64 * 2)(1, -1), marks) == -1
    assert lib.am_adamw_step_tasks(32, 2, -1, (ctypes.c_int64 * 2)(1, 1), marks) == -1
    assert list(marks) == [7, 7]
