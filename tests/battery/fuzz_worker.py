"""Fuzz worker: runs seeded misuse cases against AMAdamW/AMSGD in this process, one JSON line per case.

Usage::

    python tests/battery/fuzz_worker.py CASES.json OUT.jsonl

``CASES.json`` is a JSON list of specs ``{"id": int, "seed": int, "kind": str, "opt": "am_adamw"|"am_sgd",
"path": one of PATHS}`` (``kind``/``opt``/``path`` optional: drawn from the seed), or
``{"range": [first, stop]}`` for the cases ``case_spec(i)`` of that seed range.  Each finished case appends
one line to ``OUT.jsonl`` (flushed and fsynced), so a launcher that sees this process die knows which case
was running: the first one without a line.

A line holds ``id``, ``kind``, ``variant``, ``opt``, ``path``, ``outcome`` and:

* ``ok``: every hf_am call ran, and the results are finite where torch's AdamW/SGD on the same input
  stay finite (or equal the reference path, where the case compares paths);
* ``raised``: an hf_am call raised a normal Python exception with a message (``phase``, ``type``,
  ``message``), and left parameters, state and param groups bit-identical;
* ``bad``: ``reasons`` says what went wrong -- a raising call that changed something, an empty message,
  an exception type that is no normal validation error (``SystemError``, ``AttributeError``, ... raised
  inside hf_am), a non-finite result where torch stays finite, a refusal expected and missing, a
  result that differs from the reference path, or an error in the harness itself.

Case kinds (``KINDS``) cover dtype/shape/device/layout misuse of parameters, gradients and state,
sparse and complex tensors, random and bad hyperparameters and param groups (in the constructor, in
``add_param_group`` and written into a group after construction), ``load_state_dict`` of garbage and
of other optimizers' state, closures returning odd losses, huge/inf/NaN gradients, and the compiled
kernel cache (truncated, corrupt, foreign, writable, unwritable, symlinked files; ``cache``: each
case points ``HF_AM_CACHE`` at a fresh directory, plants the worker's own library there in a damaged
form, resets ``cpu_build._state`` and steps, then restores the worker's library).  The hidden kinds
(selected only by spec) are negative controls: ``sigsegv``/``exit`` kill the process, and
``selftest_*`` must come out ``bad``.
"""

from __future__ import annotations

import copy
import fractions
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

# (test_fuzz.py starts the workers with HF_AM_NO_TRAINER_PATCH=1; nothing is set here, because
# test_fuzz.py imports this module into the pytest process, whose later subprocesses inherit os.environ)

import faulthandler
import numpy as np
import torch

import hf_am
from hf_am import AMAdamW, AMSGD
from hf_am.kernels import cpu_build

OPTS = {"am_adamw": AMAdamW, "am_sgd": AMSGD}
PATHS = {
    "fused": dict(fused=True),
    "default": {},
    "nofused": dict(fused=False),  # the multi-tensor path
    "foreach": dict(foreach=True),
    "reference": dict(foreach=False),
}
PUBLIC_KINDS = (
    "hyper",
    "groups",
    "group_mutation",
    "param_dtype",
    "grad_misuse",
    "state_misuse",
    "layout",
    "device",
    "sparse",
    "complex",
    "grad_values",
    "load_state",
    "closure",
    "mixed_groups",
    "cache",
)
HIDDEN_KINDS = ("sigsegv", "exit", "selftest_empty_message", "selftest_changes_state")
KINDS = PUBLIC_KINDS + HIDDEN_KINDS

#: exception types a validation error may have (torch's errors subclass these)
NORMAL = (ValueError, TypeError, RuntimeError)
HF_AM_DIR = str(Path(hf_am.__file__).resolve().parent)


def case_spec(i: int, base_seed: int = 20261201) -> dict:
    """The i-th case of the default mix: every (optimizer, path) pair meets every kind."""
    opt = sorted(OPTS)[i % 2]
    path = list(PATHS)[(i // 2) % len(PATHS)]
    kind = PUBLIC_KINDS[(i // 10) % len(PUBLIC_KINDS)]
    return {"id": i, "seed": base_seed + i, "kind": kind, "opt": opt, "path": path}


class Stop(Exception):
    """Ends a case early (an hf_am call raised, and was recorded)."""


# ------------------------------------------------------------------------------- comparisons
def bits_equal(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return repr(a) == repr(b)
    if (a.dtype, a.shape, a.device, a.layout) != (b.dtype, b.shape, b.device, b.layout):
        return False
    if a.device.type == "meta":
        return True
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    try:
        return copy.deepcopy(v)
    except Exception:
        return repr(v)


def _group_view(g):
    return {k: (v if isinstance(v, torch.Tensor) else repr(v)) for k, v in g.items() if k != "params"}


class Snapshot:
    """Parameters (bits), every state entry (bits), the state's keys and the param groups."""

    def __init__(self, opt, params):
        self.params = [(p, _clone(p)) for p in params]
        self.state_keys = [id(k) for k in opt.state.keys()]
        self.state = {id(k): (k, {n: _clone(v) for n, v in s.items()}) for k, s in opt.state.items()}
        self.groups = [([id(p) for p in g["params"]], {k: _clone(v) for k, v in _group_view(g).items()}) for g in opt.param_groups]

    def changes(self, opt) -> list:
        out = []
        for i, (p, saved) in enumerate(self.params):
            if not bits_equal(saved, p.detach()):
                out.append(f"parameter {i} changed")
        keys = [id(k) for k in opt.state.keys()]
        if sorted(keys) != sorted(self.state_keys):
            out.append(f"opt.state keys changed ({len(self.state_keys)} -> {len(keys)} entries)")
        for key, (p, saved) in self.state.items():
            now = opt.state.get(p) if p in opt.state else None
            if now is None:
                continue
            if set(now) != set(saved):
                out.append(f"state of a parameter changed its keys {sorted(saved)} -> {sorted(now)}")
            for name, value in saved.items():
                if name in now and not bits_equal(value, now[name]):
                    out.append(f"state {name!r} changed")
        groups = [([id(p) for p in g["params"]], _group_view(g)) for g in opt.param_groups]
        if len(groups) != len(self.groups):
            out.append(f"param_groups changed from {len(self.groups)} to {len(groups)} groups")
        for gi, ((ids, opts), (ids_now, opts_now)) in enumerate(zip(self.groups, groups)):
            if ids != ids_now:
                out.append(f"param group {gi} changed its parameters")
            if set(opts) != set(opts_now):
                out.append(f"param group {gi} changed its keys {sorted(set(opts) ^ set(opts_now))}")
            for k in opts:
                if k in opts_now and not bits_equal(opts[k], opts_now[k]):
                    out.append(f"param group {gi} option {k!r} changed")
        return out


def finite(t) -> bool:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
        return True
    if not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.to_dense() if t.layout != torch.strided else t
    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------------- the case
def _torch_optim_check(tb) -> bool:
    """The exception comes from torch.optim.Optimizer's own checks (e.g. KeyError 'params'), called by hf_am."""
    last = max((i for i, f in enumerate(tb) if f.filename.startswith(HF_AM_DIR)), default=-1)
    return any(f.filename.replace(os.sep, "/").endswith("torch/optim/optimizer.py") for f in tb[last + 1:])


class Case:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        rng = self.rng
        self.kind = spec.get("kind") or rng.choice(PUBLIC_KINDS)
        self.opt_name = spec.get("opt") or rng.choice(sorted(OPTS))
        self.path = spec.get("path") or rng.choice(list(PATHS))
        self.cls = OPTS[self.opt_name]
        self.variant = ""
        self.raised = None
        self.bad: list = []
        self.notes: list = []
        self.calls = 0
        torch.manual_seed(spec["seed"])

    # -- options
    def path_kw(self) -> dict:
        return dict(PATHS[self.path])

    def base_kw(self, **extra) -> dict:
        kw = {"lr": 1e-2 if self.cls is AMAdamW else 5e-2}
        kw.update(self.path_kw())
        kw.update(extra)
        return kw

    # -- calling hf_am
    def call(self, phase: str, fn, opt=None, params=(), expect=None, init=False):
        """Run one hf_am call; on an exception record it, check it and what it left, and stop the case."""
        snap = Snapshot(opt, params) if opt is not None else None
        self.calls += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = fn()
        except Stop:
            raise
        except BaseException as exc:  # noqa: BLE001 - everything is classified
            if isinstance(exc, (KeyboardInterrupt,)):
                raise
            self._record(phase, exc, snap, opt, init)
            raise Stop() from None
        if expect == "raise":
            self.bad.append(f"{phase}: expected a refusal ({self.variant}), the call returned normally")
        return value

    def _record(self, phase, exc, snap, opt, init):
        tb = traceback.extract_tb(exc.__traceback__)
        origin = tb[-1].filename if tb else "?"
        in_hf_am = any(f.filename.startswith(HF_AM_DIR) for f in tb)
        innermost_hf_am = origin.startswith(HF_AM_DIR)
        message = str(exc)
        where = "; ".join(f"{Path(f.filename).name}:{f.lineno}" for f in tb[-4:])
        self.raised = {"phase": phase, "type": type(exc).__name__, "message": message[:600], "where": where}
        if not message.strip():
            self.bad.append(f"{phase}: {type(exc).__name__} with an empty message (at {where})")
        if isinstance(exc, (SystemError, MemoryError, RecursionError)) or not isinstance(exc, Exception):
            self.bad.append(f"{phase}: abnormal exception {type(exc).__name__}: {message[:200]} (at {where})")
        elif not isinstance(exc, NORMAL) and (innermost_hf_am or (in_hf_am and not origin.startswith(str(Path(torch.__file__).parent)))):
            self.bad.append(f"{phase}: {type(exc).__name__} from inside hf_am, not a validation error: {message[:200]} (at {where})")
        elif init and not isinstance(exc, (ValueError, TypeError)) and in_hf_am and not _torch_optim_check(tb):
            self.bad.append(f"{phase}: bad options gave {type(exc).__name__}, not ValueError/TypeError: {message[:200]} (at {where})")
        if snap is not None:
            changed = snap.changes(opt)
            if changed:
                self.bad.append(f"{phase}: raised {type(exc).__name__} ({message[:160]}) and changed: {'; '.join(changed[:6])}")

    def result(self) -> dict:
        out = {
            "id": self.spec["id"],
            "seed": self.spec["seed"],
            "kind": self.kind,
            "variant": self.variant,
            "opt": self.opt_name,
            "path": self.path,
        }
        if self.bad:
            out.update(outcome="bad", reasons=self.bad)
            if self.raised:
                out["raised"] = self.raised
        elif self.raised:
            out.update(outcome="raised", **self.raised)
        else:
            out["outcome"] = "ok"
        if self.notes:
            out["notes"] = self.notes
        return out


# ----------------------------------------------------------------------------------- helpers
SHAPES = [(7,), (3, 4), (2, 3, 4, 5), (1,), (5, 1), (16,), (4, 4, 3)]


def rand_params(c: Case, n=None, dtype=torch.float32, shapes=None):
    n = n or c.rng.randint(1, 4)
    shapes = shapes or [c.rng.choice(SHAPES) for _ in range(n)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def set_grads(c: Case, params, scale=1.0):
    for p in params:
        if p.device.type == "meta":
            p.grad = torch.empty_like(p)
        else:
            p.grad = (torch.randn_like(p.detach(), dtype=p.dtype) * scale).to(p.dtype)


def warmup(c: Case, opt, params, steps=None):
    for _ in range(c.rng.randint(1, 3) if steps is None else steps):
        set_grads(c, params)
        c.call("warmup", opt.step, opt, params)


def step(c: Case, opt, params, phase="step", expect=None, closure=None):
    return c.call(phase, (lambda: opt.step(closure)) if closure else opt.step, opt, params, expect=expect)


def check_finite_after(c: Case, opt, params, why=""):
    """Finite inputs of moderate size must give finite parameters and state (torch's optimizers do)."""
    bad = [i for i, p in enumerate(params) if not finite(p)]
    for p in params:
        for name, v in (opt.state.get(p) or {}).items():
            if not finite(v):
                bad.append(f"state {name}")
    if bad:
        c.bad.append(f"non-finite result from finite inputs{why}: {bad[:6]}")


def torch_twin(c: Case, params, kw):
    """torch's AdamW/SGD with the same settings (None when torch refuses them)."""
    try:
        if c.cls is AMAdamW:
            return torch.optim.AdamW(params, lr=float(kw.get("lr", 1e-3)), betas=tuple(float(b) for b in kw.get("betas", (0.9, 0.999))),
                                     eps=float(kw.get("eps", 1e-8)), weight_decay=float(kw.get("weight_decay", 1e-2)), foreach=False)
        m = float(kw.get("momentum", 0.9))
        return torch.optim.SGD(params, lr=float(kw.get("lr", 1e-3)), momentum=m, dampening=m,
                               weight_decay=float(kw.get("weight_decay", 0.0)), foreach=False)
    except Exception:
        return None


def compare_finiteness(c: Case, am_params, torch_params, what=""):
    for i, (a, t) in enumerate(zip(am_params, torch_params)):
        if finite(t) and not finite(a):
            c.bad.append(f"parameter {i} non-finite where torch's {'AdamW' if c.cls is AMAdamW else 'SGD'} stays finite{what}")


def close_to(c: Case, got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            c.bad.append(f"{what}: parameter {i} shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if a.numel() == 0 or a.device.type == "meta":
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        if not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            c.bad.append(f"{what}: parameter {i} finite where the reference is not, or the other way round")
            continue
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(a.dtype, 5e-2)
        diff = (a64 - b64).abs().masked_fill(both_nan | ~torch.isfinite(b64), 0).max().item()
        scale = 1.0 + b64.abs().masked_fill(~torch.isfinite(b64), 0).max().item()
        if diff > tol * scale:
            c.bad.append(f"{what}: parameter {i} differs from the reference path by {diff:.3g} (scale {scale:.3g})")


def run_steps(cls, params, kw, grads_seq):
    opt = cls(params, **kw)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


# -------------------------------------------------------------------- hyperparameter pools
def bad_number(c: Case):
    return c.rng.choice([
        -1.0, -1e-8, float("inf"), float("-inf"), float("nan"), 1e300, -0.0, 0.0, 10**400, 2**70, "0.1", None, [0.1], (0.1,),
        np.float32(0.1), np.float64(float("nan")), np.int64(1), np.bool_(True), np.array(0.1), np.array([0.1, 0.2]),
        torch.tensor(0.1), torch.tensor([0.1]), torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor(True), torch.tensor(float("nan")),
        torch.tensor(1 + 1j), torch.tensor([0.1, 0.2]), torch.tensor([]), torch.tensor(3), True, False, 1, fractions.Fraction(1, 10),
        complex(0.1, 0), object(), b"0.1", {"lr": 1},
    ])


def good_form(c: Case, x: float):
    """x as a Python float, a numpy scalar or a 0-dim tensor."""
    return c.rng.choice([x, x, np.float32(x), np.float64(x), torch.tensor(x), torch.tensor(x, dtype=torch.float64)])


def hyper_options(c: Case, p_bad=0.12) -> dict:
    rng = c.rng
    kw = {}
    good = {"lr": 1e-2, "weight_decay": 0.01, "lam": 0.1, "beta_min": 0.0, "restart_threshold": None}
    if c.cls is AMAdamW:
        good.update(eps=1e-8)
    else:
        good.update(momentum=0.9)
    for key, value in good.items():
        r = rng.random()
        if r < p_bad:
            kw[key] = bad_number(c)
        elif r < 0.6 and value is not None:
            kw[key] = good_form(c, rng.choice([value, value * rng.choice([0.5, 2.0, 10.0]), 0.0 if key != "eps" else 1e-12]))
        elif key == "restart_threshold" and r < 0.75:
            kw[key] = rng.choice([0.5, 1.0, 0.01, np.float64(0.3)])
    if c.cls is AMAdamW and rng.random() < 0.5:
        kw["betas"] = rng.choice([
            (0.9,), (0.9, 0.999, 0.5), [0.9, 0.99], (float("nan"), 0.99), (1.0, 0.99), (0.9, 1.0), (-0.1, 0.9), "ab", None,
            (np.float32(0.9), torch.tensor(0.99)), (torch.tensor([0.9, 0.8]), 0.99), (0.5, 0.5), (0.0, 0.0), 0.9, (0.9, "x"),
        ])
    if rng.random() < 0.1:  # a Python int too large for a float
        kw[rng.choice(list(good))] = rng.choice([10**400, -(10**400), 2**1100])
    for key in ("foreach", "fused", "maximize"):
        if rng.random() < 0.15:
            kw[key] = rng.choice([None, True, False, 1, 0, "yes", np.bool_(True), torch.tensor(True)])
    if rng.random() < 0.15:
        kw["scope"] = rng.choice(["model", "group", "tensor", "layer", None, 0])
    if rng.random() < 0.1:
        kw["loss_estimate"] = rng.choice(["exact", "linear", "quadratic", None])
    if rng.random() < 0.1:
        extra = ["amsgrad", "capturable", "differentiable"] if c.cls is AMAdamW else ["nesterov", "dampening", "capturable", "differentiable"]
        kw[rng.choice(extra)] = rng.choice([True, 0.0, 0.9, False, None])
    return kw


# ------------------------------------------------------------------------------ case kinds
def case_hyper(c: Case):
    kw = {**c.path_kw(), **hyper_options(c)}
    c.variant = ",".join(sorted(kw))
    params = rand_params(c)
    opt = c.call("init", lambda: c.cls(params, **kw), init=True)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    g = opt.param_groups[0]
    twin_kw = {k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "momentum") if k in g}
    twin = torch_twin(c, twin_params, twin_kw)
    exact = opt.loss_estimate == "exact"
    for s in range(3):
        set_grads(c, params)
        for p, q in zip(params, twin_params):
            q.grad = p.grad.clone()
        closure = (lambda: torch.tensor(1.0 / (s + 1))) if exact else None
        step(c, opt, params, phase=f"step{s}", closure=closure)
        if twin is not None:
            twin.step()
    if twin is not None:
        compare_finiteness(c, params, twin_params, f" ({c.variant})")


def case_groups(c: Case):
    rng = c.rng
    params = rand_params(c, n=rng.randint(2, 4))
    scope = rng.choice(["model", "group", "tensor"])
    variant = rng.choice([
        "duplicate_across_groups", "duplicate_in_group", "missing_params", "tensor_params", "set_params", "empty_group",
        "complex_param", "nonleaf_param", "model_scope_disagree", "fused_and_foreach", "bad_option", "int_param",
        "unknown_key", "not_a_dict", "generator",
    ])
    c.variant = variant
    opt = c.call("init", lambda: c.cls([{"params": params[:1]}], scope=scope, **c.base_kw()), init=True)
    warmup(c, opt, params[:1], steps=1)
    new = params[1:]
    group = {
        "duplicate_across_groups": lambda: {"params": [params[0]]},
        "duplicate_in_group": lambda: {"params": [new[0], new[0]]},
        "missing_params": lambda: {"lr": 0.1},
        "tensor_params": lambda: {"params": new[0]},
        "set_params": lambda: {"params": set(new)},
        "empty_group": lambda: {"params": []},
        "complex_param": lambda: {"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]},
        "nonleaf_param": lambda: {"params": [new[0] * 2]},
        "model_scope_disagree": lambda: {"params": new, "lam": 0.5, "beta_min": 0.1},
        "fused_and_foreach": lambda: {"params": new, "fused": True, "foreach": rng.choice([True, False])},
        "bad_option": lambda: {"params": new, rng.choice(["lr", "lam", "weight_decay", "beta_min", "restart_threshold"]): bad_number(c)},
        "int_param": lambda: {"params": [torch.zeros(3, dtype=torch.int64)]},
        "unknown_key": lambda: {"params": new, "colour": "blue"},
        "not_a_dict": lambda: [("params", new)],
        "generator": lambda: {"params": (p for p in new)},
    }[variant]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c.call("add_param_group", lambda: opt.add_param_group(group), opt, params, init=True)
    stepping = [p for g in opt.param_groups for p in g["params"]]
    for p in stepping:
        if p.is_floating_point() and p.requires_grad:
            p.grad = torch.randn_like(p)
        elif not p.is_complex():
            p.grad = torch.ones_like(p)
    step(c, opt, stepping)
    check_finite_after(c, opt, [p for p in stepping if p.is_floating_point()])


def case_group_mutation(c: Case):
    """A bad value written into a param group after construction (as a scheduler or a user would)."""
    rng = c.rng
    params = rand_params(c, n=rng.randint(2, 4))
    opt = c.call("init", lambda: c.cls([{"params": params[:1]}, {"params": params[1:]}], scope=rng.choice(["group", "tensor"]), **c.base_kw()), init=True)
    warmup(c, opt, params)
    keys = ["lr", "weight_decay", "lam", "beta_min", "restart_threshold", "fused", "foreach", "maximize"]
    keys += ["betas", "eps"] if c.cls is AMAdamW else ["momentum"]
    key = rng.choice(keys)
    if key == "betas":
        value = rng.choice([(0.9,), (float("nan"), 0.99), "ab", None, (0.9, 1.5), (0.9, "x")])
    elif key in ("fused", "foreach", "maximize"):
        value = rng.choice(["yes", 1, None, True, False])
    else:
        value = bad_number(c)
    gi = rng.choice([0, 1, 1])
    opt.param_groups[gi][key] = value
    c.variant = f"group{gi}.{key}={value!r}"[:80]
    set_grads(c, params)
    step(c, opt, params)


def case_param_dtype(c: Case):
    rng = c.rng
    variant = rng.choice(["to_dtype_after_steps", "fresh_low_precision", "mixed_in_group", "int_param", "data_other_shape", "data_other_dtype_fresh"])
    c.variant = variant
    src = rng.choice([torch.float32, torch.float64])
    params = rand_params(c, dtype=src)
    if variant == "fresh_low_precision":
        dt = rng.choice([torch.bfloat16, torch.float16])
        params = [torch.nn.Parameter(p.detach().to(dt)) for p in params]
    if variant == "mixed_in_group":
        params.append(torch.nn.Parameter(torch.randn(5, dtype=torch.float64 if src == torch.float32 else torch.float32)))
    if variant == "int_param":
        params.append(torch.zeros(4, dtype=rng.choice([torch.int32, torch.int64])))
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    if variant == "to_dtype_after_steps":
        warmup(c, opt, params)
        dt = rng.choice([torch.float64, torch.float32, torch.bfloat16, torch.float16])
        for p in params:
            p.data = p.data.to(dt)
        set_grads(c, params)
        expect = "raise" if (dt != src and (c.cls is AMAdamW or any("momentum_buffer" in opt.state[p] for p in params))) else None
        step(c, opt, params, expect=expect)
        return
    if variant == "data_other_shape":
        warmup(c, opt, params)
        p = rng.choice(params)
        p.data = torch.randn(p.numel() + rng.choice([1, 2, 5]), dtype=p.dtype)
        set_grads(c, params)
        step(c, opt, params, expect="raise" if c.cls is AMAdamW or "momentum_buffer" in opt.state[p] else None)
        return
    if variant == "data_other_dtype_fresh":
        for p in params:
            p.data = p.data.to(rng.choice([torch.bfloat16, torch.float16, torch.float64]))
    if variant == "int_param":
        for p in params:
            if p.is_floating_point():
                p.grad = torch.randn_like(p)
            else:
                p.grad = torch.ones_like(p)
        step(c, opt, params)
        return
    for s in range(2):
        set_grads(c, params)
        step(c, opt, params, phase=f"step{s}")
    check_finite_after(c, opt, params)


def force_grad(p, g):
    """Give ``p`` a gradient torch's setter refuses (other shape/dtype), as a buggy hook could."""
    p.grad = torch.zeros_like(p)
    p.grad.data = g


def case_grad_misuse(c: Case):
    rng = c.rng
    params = rand_params(c, dtype=rng.choice([torch.float32, torch.float64]))
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    if rng.random() < 0.6:
        warmup(c, opt, params)
    set_grads(c, params)
    p = rng.choice(params)
    variant = rng.choice(["shape", "dtype", "int", "bool", "complex", "noncontiguous", "expanded", "alias_param", "scalar", "empty"])
    c.variant = variant
    expect = "raise"
    if variant == "shape":
        force_grad(p, torch.randn(p.numel() + rng.choice([-1, 1, 3]) if p.numel() > 1 else 3, dtype=p.dtype))
    elif variant == "dtype":
        force_grad(p, torch.randn(p.shape).to(rng.choice([d for d in (torch.float16, torch.bfloat16, torch.float64, torch.float32) if d != p.dtype])))
    elif variant == "int":
        force_grad(p, torch.ones(p.shape, dtype=rng.choice([torch.int32, torch.int64, torch.int8])))
    elif variant == "bool":
        force_grad(p, torch.ones(p.shape, dtype=torch.bool))
    elif variant == "complex":
        force_grad(p, torch.randn(p.shape, dtype=torch.complex64 if p.dtype == torch.float32 else torch.complex128))
    elif variant == "noncontiguous":
        base = torch.randn(tuple(reversed(p.shape)), dtype=p.dtype)
        p.grad = base.permute(*reversed(range(p.dim())))
        expect = None  # a layout the kernels decline is refused by fused=True only
    elif variant == "expanded":
        p.grad = torch.randn(1, dtype=p.dtype).expand(p.shape)
        expect = None
    elif variant == "alias_param":
        p.grad = p.detach()
        expect = None
    elif variant == "scalar":
        force_grad(p, torch.tensor(1.0, dtype=p.dtype))
        expect = "raise" if p.shape != () else None
    elif variant == "empty":
        force_grad(p, torch.empty(0, dtype=p.dtype))
    step(c, opt, params, expect=expect)
    if variant in ("noncontiguous", "expanded", "alias_param"):
        check_finite_after(c, opt, params)


def case_state_misuse(c: Case):
    rng = c.rng
    params = rand_params(c, dtype=rng.choice([torch.float32, torch.float64]))
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    warmup(c, opt, params, steps=rng.randint(2, 3))
    p = rng.choice(params)
    state = opt.state[p]
    name = rng.choice(list(opt.state_tensor_names))
    variant = rng.choice([
        "size", "dtype", "meta", "list", "float", "none", "noncontiguous_same_shape", "scalar_state_int", "scalar_state_2elem",
        "scalar_state_python", "scalar_state_meta", "delete_tensor", "delete_step", "delete_prod", "nan_state", "scalar_state_f64",
    ])
    c.variant = variant
    expect = "raise"
    if variant == "size":
        state[name] = torch.zeros(p.numel() + rng.choice([1, 7, -1 if p.numel() > 1 else 2]), dtype=p.dtype)
    elif variant == "dtype":
        state[name] = state[name].to(rng.choice([d for d in (torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.int32) if d != p.dtype]))
    elif variant == "meta":
        state[name] = torch.empty(p.shape, dtype=p.dtype, device="meta")
    elif variant == "list":
        state[name] = state[name].tolist()
    elif variant == "float":
        state[name] = 0.5
    elif variant == "none":
        state[name] = None
        expect = None
    elif variant == "noncontiguous_same_shape":
        state[name] = state[name].detach().clone().t().contiguous().t() if p.dim() == 2 else state[name]
        expect = None
    elif variant.startswith("scalar_state"):
        key = rng.choice(["step", "am_prod", "am_beta", "am_restarts"] if c.cls is AMAdamW else ["step", "am_beta", "am_restarts"])
        c.variant += f":{key}"
        value = state[key]
        if variant == "scalar_state_int":
            state[key] = value.to(torch.int64)
        elif variant == "scalar_state_2elem":
            state[key] = value.reshape(1).repeat(2)
        elif variant == "scalar_state_python":
            state[key] = float(value)
        elif variant == "scalar_state_meta":
            state[key] = value.to("meta")
        else:
            state[key] = value.double()
            expect = None
    elif variant == "delete_tensor":
        del state[name]
        expect = None
    elif variant == "delete_step":
        del state["step"]
        expect = None
    elif variant == "delete_prod":
        state.pop("am_prod", None)
        state.pop("am_beta", None)
        expect = None
    elif variant == "nan_state":
        state[name] = torch.full_like(state[name], float("nan"))
        expect = None
    set_grads(c, params)
    step(c, opt, params, expect=expect)


def _layout_param(c: Case, variant: str):
    rng = c.rng
    if variant == "channels_last":
        return torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    if variant == "transposed":
        return torch.nn.Parameter(torch.randn(5, 3).t())
    if variant == "strided_slice":
        return torch.nn.Parameter(torch.randn(6, 8)[:, ::2])
    if variant == "offset_view":
        return torch.nn.Parameter(torch.randn(40)[3:20])
    if variant == "empty":
        return torch.nn.Parameter(torch.randn(rng.choice([(0,), (3, 0), (0, 4, 2)])))
    if variant == "zero_dim":
        return torch.nn.Parameter(torch.tensor(0.7))
    if variant == "large_odd":
        return torch.nn.Parameter(torch.randn(rng.choice([1021, 4099, 777])))
    raise AssertionError(variant)


LAYOUTS = ["channels_last", "transposed", "strided_slice", "offset_view", "empty", "zero_dim", "large_odd"]


def case_layout(c: Case):
    rng = c.rng
    variants = rng.sample(LAYOUTS, rng.randint(1, 3))
    grad_layout = rng.choice(["like", "contiguous"])
    expanded = rng.random() < 0.2
    c.variant = "+".join(variants) + f"/grad_{grad_layout}" + ("+expanded" if expanded else "")
    params = [_layout_param(c, v) for v in variants]
    if expanded:
        params.append(torch.nn.Parameter(torch.randn(3, 1).expand(3, 4)))
    dtype = rng.choice([torch.float32, torch.float64])
    params = [torch.nn.Parameter(p.detach().to(dtype)) if p.dtype != dtype else p for p in params]
    grads_seq = []
    for _ in range(3):
        gs = []
        for p in params:
            g = torch.randn(p.shape, dtype=dtype)
            if grad_layout == "like" and not expanded:
                g = torch.empty_like(p).copy_(g)
            gs.append(g)
        grads_seq.append(gs)
    kw = c.base_kw(scope=rng.choice(["model", "group", "tensor"]))
    ref_params = [torch.nn.Parameter(p.detach().clone().contiguous()) for p in params]
    opt = c.call("init", lambda: c.cls(params, **kw), init=True)
    for s, grads in enumerate(grads_seq):
        for p, g in zip(params, grads):
            p.grad = g
        step(c, opt, params, phase=f"step{s}")
    if expanded:
        return
    ref_kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}
    run_steps(c.cls, ref_params, {**ref_kw, "foreach": False}, grads_seq)
    close_to(c, params, ref_params, f"layout {c.variant}")


def case_device(c: Case):
    rng = c.rng
    variant = rng.choice(["all_meta", "mixed_group", "state_to_meta", "cpu_state_on_meta_param", "meta_lr", "meta_grad_cpu_state_groups"])
    c.variant = variant
    if variant == "all_meta":
        params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [rng.choice(SHAPES) for _ in range(rng.randint(1, 3))]]
        opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
        for s in range(2):
            set_grads(c, params)
            step(c, opt, params, phase=f"step{s}")
        return
    if variant == "mixed_group":
        params = rand_params(c) + [torch.nn.Parameter(torch.empty(4, device="meta"))]
        opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
        set_grads(c, params)
        step(c, opt, params)
        return
    if variant == "meta_lr":
        params = rand_params(c)
        c.call("init", lambda: c.cls(params, **c.base_kw(lr=torch.tensor(0.01, device="meta"))), init=True)
        return
    if variant == "meta_grad_cpu_state_groups":
        cpu = rand_params(c, n=1)
        meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
        opt = c.call("init", lambda: c.cls([{"params": cpu}, {"params": meta}], scope="group", **c.base_kw()), init=True)
        set_grads(c, cpu + meta)
        step(c, opt, cpu + meta)
        return
    params = rand_params(c)
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    warmup(c, opt, params, steps=2)
    p = rng.choice(params)
    if variant == "state_to_meta":
        name = rng.choice(list(opt.state_tensor_names) + ["step"])
        c.variant += f":{name}"
        opt.state[p][name] = opt.state[p][name].to("meta")
        set_grads(c, params)
        step(c, opt, params, expect="raise")
    else:  # a meta parameter given a CPU parameter's state
        meta = torch.nn.Parameter(torch.empty(p.shape, device="meta"))
        opt2 = c.call("init", lambda: c.cls([meta], **c.base_kw()), init=True)
        opt2.state[meta] = opt.state[p]
        meta.grad = torch.empty_like(meta)
        step(c, opt2, [meta], expect="raise")


def case_sparse(c: Case):
    rng = c.rng
    variant = rng.choice(["sparse_grad", "sparse_grad_after_steps", "sparse_param", "sparse_uncoalesced"])
    c.variant = variant
    if variant == "sparse_param":
        params = [torch.nn.Parameter(torch.randn(4, 3).to_sparse())]
        opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
        params[0].grad = torch.randn(4, 3).to_sparse()
        step(c, opt, params, expect="raise")
        return
    params = rand_params(c, shapes=[(4, 3), (5,)])
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    if variant == "sparse_grad_after_steps":
        warmup(c, opt, params)
    set_grads(c, params)
    if variant == "sparse_uncoalesced":
        i = torch.tensor([[0, 0, 1], [1, 1, 2]])
        params[0].grad = torch.sparse_coo_tensor(i, torch.ones(3), (4, 3))
    else:
        params[0].grad = params[0].grad.to_sparse()
    step(c, opt, params, expect="raise")


def case_complex(c: Case):
    rng = c.rng
    variant = rng.choice(["complex_param_init", "complex_param_add_group", "complex_grad", "complex_data_after_init", "complex_state"])
    c.variant = variant
    dt = rng.choice([torch.complex64, torch.complex128])
    if variant == "complex_param_init":
        params = rand_params(c) + [torch.nn.Parameter(torch.randn(3, dtype=dt))]
        c.call("init", lambda: c.cls(params, **c.base_kw()), expect="raise", init=True)
        return
    params = rand_params(c)
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    if rng.random() < 0.5:
        warmup(c, opt, params)
    if variant == "complex_param_add_group":
        c.call("add_param_group", lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=dt))]}), opt, params, expect="raise", init=True)
        return
    set_grads(c, params)
    p = rng.choice(params)
    if variant == "complex_grad":
        force_grad(p, torch.randn(p.shape, dtype=dt))
    elif variant == "complex_data_after_init":
        p.data = torch.randn(p.shape, dtype=dt)
        p.grad = torch.randn(p.shape, dtype=dt)
    else:
        warmup(c, opt, params, steps=1)
        name = rng.choice(list(opt.state_tensor_names))
        opt.state[p][name] = opt.state[p][name].to(dt)
        set_grads(c, params)
    step(c, opt, params, expect="raise")


def special_grad(c: Case, p: torch.Tensor) -> torch.Tensor:
    rng = c.rng
    g = torch.randn(p.shape, dtype=torch.float64)
    how = rng.choice(["huge", "tiny", "inf", "nan", "mixed", "normal", "zero", "max", "subnormal", "one_huge"])
    if how == "huge":
        g = g * 10.0 ** rng.choice([10, 19, 30, 37, 100, 300])
    elif how == "tiny":
        g = g * 10.0 ** -rng.choice([10, 30, 40, 300])
    elif how == "inf" and g.numel():
        g.view(-1)[rng.randrange(g.numel())] = rng.choice([float("inf"), float("-inf")])
    elif how == "nan" and g.numel():
        g.view(-1)[rng.randrange(g.numel())] = float("nan")
    elif how == "zero":
        g.zero_()
    elif how == "max":
        g = torch.full(p.shape, torch.finfo(p.dtype).max, dtype=torch.float64) * rng.choice([1, -1])
    elif how == "subnormal":
        g = g * torch.finfo(p.dtype).tiny / 4
    elif how == "one_huge" and g.numel():
        g.view(-1)[rng.randrange(g.numel())] = 1e19
    elif how == "mixed":
        g = g * torch.tensor([10.0 ** rng.choice([-30, 0, 30]) for _ in range(g.numel())], dtype=torch.float64).view(p.shape)
    return g.to(p.dtype)


def case_grad_values(c: Case):
    """Huge/inf/NaN/tiny gradients: where torch's AdamW/SGD stays finite, AM must too."""
    rng = c.rng
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    params = rand_params(c, dtype=dtype)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = c.base_kw(scope=rng.choice(["model", "group", "tensor"]), weight_decay=rng.choice([0.0, 0.01]))
    if rng.random() < 0.3:
        kw["restart_threshold"] = 0.5
    if rng.random() < 0.3:
        kw["maximize"] = True
    c.variant = f"{str(dtype)[6:]}/{kw['scope']}"
    opt = c.call("init", lambda: c.cls(params, **kw), init=True)
    twin_kw = dict(lr=kw["lr"], weight_decay=kw["weight_decay"])
    twin = torch_twin(c, twin_params, twin_kw)
    if kw.get("maximize"):
        twin.param_groups[0]["maximize"] = True
    for s in range(rng.randint(2, 5)):
        for p, q in zip(params, twin_params):
            p.grad = special_grad(c, p)
            q.grad = p.grad.clone()
        step(c, opt, params, phase=f"step{s}")
        twin.step()
        compare_finiteness(c, params, twin_params, f" after step {s}")
        if c.bad:
            return


def case_load_state(c: Case):
    rng = c.rng
    params = rand_params(c, n=rng.randint(1, 3))
    opt = c.call("init", lambda: c.cls(params, **c.base_kw()), init=True)
    if rng.random() < 0.6:
        warmup(c, opt, params)
    variant = rng.choice([
        "empty_dict", "no_state", "garbage", "wrong_group_count", "other_shapes", "torch_adamw", "torch_adamw_amsgrad", "torch_sgd",
        "other_am", "future_format", "step_int", "state_list", "prod_wrong", "extra_keys", "ids_mismatch", "none", "string",
        "own_roundtrip", "missing_tensor", "state_meta", "betas_garbage",
    ])
    c.variant = variant
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def trained(make, ps):
        o = make(ps)
        for _ in range(2):
            for q in ps:
                q.grad = torch.randn_like(q)
            o.step()
        return o

    expect = None
    if variant == "empty_dict":
        sd = {}
    elif variant == "none":
        sd = None
    elif variant == "string":
        sd = "state"
    elif variant == "no_state":
        sd = {"param_groups": opt.state_dict()["param_groups"]}
    elif variant == "garbage":
        sd = {"state": {0: {"exp_avg": "x", "step": [1, 2]}}, "param_groups": [{"params": [0], "lr": "fast"}]}
    elif variant == "wrong_group_count":
        sd = opt.state_dict()
        sd["param_groups"] = sd["param_groups"] * 2
        expect = "raise"
    elif variant == "other_shapes":
        other = [torch.nn.Parameter(torch.randn(p.numel() + 1)) for p in params]
        sd = trained(lambda ps: c.cls(ps, **c.base_kw()), other).state_dict()
        expect = "raise"
    elif variant == "torch_adamw":
        sd = trained(lambda ps: torch.optim.AdamW(ps, lr=1e-2), twin_params).state_dict()
        expect = "raise" if c.cls is AMSGD else None
    elif variant == "torch_adamw_amsgrad":
        sd = trained(lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True), twin_params).state_dict()
        expect = "raise"
    elif variant == "torch_sgd":
        sd = trained(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), twin_params).state_dict()
        expect = "raise"
    elif variant == "other_am":
        other_cls = AMSGD if c.cls is AMAdamW else AMAdamW
        sd = trained(lambda ps: other_cls(ps, **{**c.base_kw(), "lr": 1e-2}), twin_params).state_dict()
    elif variant == "future_format":
        sd = opt.state_dict()
        for g in sd["param_groups"]:
            g["am_state_format"] = rng.choice([99, "2", None, 0, 2.0])
    else:
        sd = copy.deepcopy(trained(lambda ps: c.cls(ps, **c.base_kw()), twin_params).state_dict())
        entries = list(sd["state"].values())
        entry = entries[0] if entries else {}
        name = rng.choice(list(c.cls.state_tensor_names))
        if variant == "step_int" and entry:
            entry["step"] = rng.choice([3, torch.tensor(3), torch.tensor([1.0, 2.0]), "3", None])
        elif variant == "state_list" and entry:
            entry[name] = entry[name].tolist()
            expect = "raise"
        elif variant == "prod_wrong" and entry:
            key = rng.choice(["am_prod", "am_beta", "am_restarts"] if c.cls is AMAdamW else ["am_beta", "am_restarts"])
            entry[key] = rng.choice([torch.zeros(3), torch.tensor(float("nan")), "x", torch.tensor(1, dtype=torch.int64)])
        elif variant == "extra_keys" and entry:
            entry["junk"] = torch.randn(5)
            sd["param_groups"][0]["junk"] = object()
        elif variant == "ids_mismatch":
            sd["state"] = {k + 1000: v for k, v in sd["state"].items()}
        elif variant == "missing_tensor" and entry:
            del entry[name]
            expect = "raise" if len(c.cls.state_tensor_names) > 1 else None
        elif variant == "state_meta" and entry:
            entry[name] = entry[name].to("meta")
        elif variant == "betas_garbage":
            for g in sd["param_groups"]:
                g["betas" if c.cls is AMAdamW else "momentum"] = rng.choice([(0.9,), "x", None, float("nan"), 5.0])
    c.call("load_state_dict", lambda: opt.load_state_dict(sd), opt, params, expect=expect)
    for gi, g in enumerate(opt.param_groups):  # what was loaded must pass the constructor's checks
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                type(opt).validate_group_options(copy.copy(g))
        except Exception as exc:
            c.bad.append(f"load_state_dict accepted param group {gi} options the constructor refuses: {type(exc).__name__}: {str(exc)[:160]}")
    sane = all(finite(v) for s in opt.state.values() for v in s.values())
    set_grads(c, params)
    step(c, opt, params)
    if sane:
        check_finite_after(c, opt, params, f" after loading {variant}")


def case_closure(c: Case):
    rng = c.rng
    params = rand_params(c)
    exact = rng.random() < 0.8
    kw = c.base_kw(scope="model", loss_estimate="exact") if exact else c.base_kw()
    variant = rng.choice(["none", "nan", "inf", "float", "string", "two_elements", "int", "raises", "numpy", "complex", "meta", "normal", "requires_grad", "bool"])
    c.variant = f"{'exact' if exact else 'linear'}:{variant}"
    opt = c.call("init", lambda: c.cls(params, **kw), init=True)

    def good_closure():
        set_grads(c, params)
        return torch.tensor(1.0)

    step(c, opt, params, phase="step0", closure=good_closure)

    def odd_closure():
        set_grads(c, params)
        if variant == "raises":
            raise ValueError("the closure failed")
        return {
            "none": None, "nan": torch.tensor(float("nan")), "inf": torch.tensor(float("inf")), "float": 0.5, "string": "loss",
            "two_elements": torch.tensor([0.5, 0.25]), "int": 1, "numpy": np.float32(0.5), "complex": torch.tensor(0.5 + 1j),
            "meta": torch.empty((), device="meta"), "normal": torch.tensor(0.5),
            "requires_grad": (sum(p.sum() for p in params) * 0.0 + 0.5), "bool": True,
        }[variant]

    step(c, opt, params, phase="step1", closure=odd_closure)
    if variant in ("normal", "float", "int", "numpy", "requires_grad"):
        check_finite_after(c, opt, params)


def case_mixed_groups(c: Case):
    """Several groups on different paths, dtypes and layouts in one optimizer equal the reference path."""
    rng = c.rng
    groups, ref_groups, all_params, ref_params = [], [], [], []
    scope = rng.choice(["group", "tensor"])
    names = []
    for gi in range(rng.randint(2, 4)):
        dtype = rng.choice([torch.float32, torch.float64])
        ps = rand_params(c, dtype=dtype)
        if rng.random() < 0.3:
            ps.append(torch.nn.Parameter(torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last)))
        path = c.path if gi == 0 else rng.choice(list(PATHS))
        names.append(path)
        opts = {k: v for k, v in PATHS[path].items()}
        if rng.random() < 0.5:
            opts["lr"] = rng.choice([1e-3, 1e-2, torch.tensor(1e-2)])
        if rng.random() < 0.3:
            opts["weight_decay"] = 0.1
        groups.append({"params": ps, **opts})
        rps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        ref_groups.append({"params": rps, **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opts.items() if k not in ("fused", "foreach")}})
        all_params += ps
        ref_params += rps
    c.variant = f"{scope}:" + "+".join(names)
    base = {"lr": 1e-2 if c.cls is AMAdamW else 5e-2}
    opt = c.call("init", lambda: c.cls(groups, scope=scope, **base), init=True)
    ref = c.cls(ref_groups, scope=scope, foreach=False, **base)
    for s in range(3):
        grads = [torch.randn_like(p) for p in all_params]
        for p, q, g in zip(all_params, ref_params, grads):
            p.grad, q.grad = g, g.clone()
        step(c, opt, all_params, phase=f"step{s}")
        ref.step()
    close_to(c, all_params, ref_params, "mixed groups")


# ------------------------------------------------------------------------------ the cache
class CacheInfo:
    """The worker's own good kernel library (built once), whose bytes the cache cases plant."""

    def __init__(self):
        self.saved_state = None
        self.name = None
        self.golden = None
        self.sidecar = None

    def ensure(self):
        if self.name is not None or cpu_build.compiler() is None:
            return self.name is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib = cpu_build.library()
        if lib is None:
            return False
        path = cpu_build._state.get("path")
        if not path:
            found = sorted(cpu_build.cache_dir().glob(f"{cpu_build.PREFIX}-*.so"))
            path = str(found[0]) if found else None
        if not path or not os.path.exists(path):
            return False
        self.name = os.path.basename(path)
        self.golden = Path(path).read_bytes()
        side = Path(path + ".sha256")
        self.sidecar = side.read_bytes() if side.exists() else None
        self.saved_state = dict(cpu_build._state)
        return True


CACHE = CacheInfo()
CACHE_VARIANTS = [
    "truncated", "truncated_no_sidecar", "corrupt", "random_bytes", "empty", "foreign_file", "foreign_sidecar", "foreign_dir",
    "writable_file", "writable_dir", "unwritable_dir", "unwritable_root", "cache_is_file", "kernels_is_file", "symlink_lib",
    "symlink_dir", "symlink_sidecar", "lib_is_dir", "lock_is_dir", "lock_symlink", "foreign_lock", "stale_temps", "huge_sidecar",
    "garbled_sidecar", "good",
]
#: variants after which the library file in a safe private directory must be a good one of ours again
REBUILT_IN_PLACE = {"truncated", "truncated_no_sidecar", "corrupt", "random_bytes", "empty", "foreign_file", "foreign_sidecar",
                    "writable_file", "symlink_lib", "symlink_sidecar", "huge_sidecar", "garbled_sidecar", "stale_temps", "good"}


def _user_dir_name() -> str:
    user = getattr(cpu_build, "_user", None)
    return user() if user else str(os.geteuid())


def _plant(c: Case, variant: str, root: Path, elsewhere: Path):
    g, name = CACHE.golden, CACHE.name
    priv = root / "kernels" / _user_dir_name()
    lib, side = priv / name, priv / (name + ".sha256")
    rng = c.rng

    def good_pair(where=priv):
        where.mkdir(parents=True, exist_ok=True)
        os.chmod(where, 0o700)
        (where / name).write_bytes(g)
        os.chmod(where / name, 0o700)
        (where / (name + ".sha256")).write_bytes(CACHE.sidecar or (hashlib.sha256(g).hexdigest() + f"  {name}\n").encode())
        os.chmod(where / (name + ".sha256"), 0o600)

    if variant == "cache_is_file":
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(root)
        root.write_bytes(b"not a directory")
        return priv
    if variant == "kernels_is_file":
        root.mkdir(parents=True, exist_ok=True)
        (root / "kernels").write_bytes(b"x")
        return priv
    if variant == "symlink_dir":
        good_pair(elsewhere)
        priv.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(elsewhere, priv)
        return priv
    good_pair()
    if variant == "truncated":
        lib.write_bytes(g[: rng.randrange(len(g))])
    elif variant == "truncated_no_sidecar":
        lib.write_bytes(g[: rng.randrange(len(g))])
        side.unlink()
    elif variant == "corrupt":
        data = bytearray(g)
        for _ in range(rng.randint(1, 50)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if bytes(data) == g:
            data[100] ^= 0xFF
        lib.write_bytes(bytes(data))
    elif variant == "random_bytes":
        lib.write_bytes(rng.randbytes(rng.randint(1, 70000)))
        if rng.random() < 0.5:
            side.write_bytes(rng.randbytes(80))
    elif variant == "empty":
        lib.write_bytes(b"")
    elif variant == "foreign_file":
        os.chown(lib, 65534, 65534)
    elif variant == "foreign_sidecar":
        os.chown(side, 65534, 65534)
    elif variant == "foreign_dir":
        os.chown(priv, 65534, 65534)
    elif variant == "writable_file":
        os.chmod(lib, rng.choice([0o666, 0o720, 0o702, 0o777]))
    elif variant == "writable_dir":
        os.chmod(priv, rng.choice([0o777, 0o770, 0o707]))
    elif variant == "unwritable_dir":
        lib.unlink()
        os.chmod(priv, 0o500)
    elif variant == "unwritable_root":
        shutil.rmtree(root / "kernels")
        os.chmod(root, 0o500)
    elif variant == "symlink_lib":
        good_pair(elsewhere)
        lib.unlink()
        os.symlink(elsewhere / name, lib)
    elif variant == "symlink_sidecar":
        good_pair(elsewhere)
        side.unlink()
        os.symlink(elsewhere / (name + ".sha256"), side)
    elif variant == "lib_is_dir":
        lib.unlink()
        lib.mkdir()
    elif variant == "lock_is_dir":
        lib.unlink()
        (priv / f"{cpu_build.PREFIX}.lock").mkdir()
    elif variant == "lock_symlink":
        lib.unlink()
        (elsewhere).mkdir(parents=True, exist_ok=True)
        (elsewhere / "lock").write_bytes(b"")
        os.symlink(elsewhere / "lock", priv / f"{cpu_build.PREFIX}.lock")
    elif variant == "foreign_lock":
        lib.unlink()
        lock = priv / f"{cpu_build.PREFIX}.lock"
        lock.write_bytes(b"")
        os.chown(lock, 65534, 65534)
    elif variant == "stale_temps":
        (priv / f"{cpu_build.PREFIX}-123-dead.tmp.so").write_bytes(g[:1000])
        (priv / f"{cpu_build.PREFIX}-456-dead.tmp").mkdir()
        if rng.random() < 0.5:
            lib.unlink()
    elif variant == "huge_sidecar":
        side.write_bytes(b"a" * 64 + b" " * 10000)
    elif variant == "garbled_sidecar":
        side.write_bytes(rng.choice([b"", b"zz" * 32, b"\xff\xfe" * 40, b"0" * 63]))
    return priv


def _is_private_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def case_cache(c: Case):
    if not CACHE.ensure():
        c.variant = "no_compiler"
        c.notes.append("no C compiler or kernels unavailable: cache case skipped")
        return
    variant = c.spec.get("variant") or c.rng.choice(CACHE_VARIANTS)
    c.variant = variant
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-cache-", dir=os.environ.get("FUZZ_TMP")))
    root, elsewhere = tmp / "cache", tmp / "elsewhere"
    old_env = os.environ.get("HF_AM_CACHE")
    try:
        priv = _plant(c, variant, root, elsewhere)
        os.environ["HF_AM_CACHE"] = str(root)
        cpu_build._state.update(tried=False, lib=None, error=None)
        if "path" in cpu_build._state:
            cpu_build._state["path"] = None
        torch.manual_seed(c.spec["seed"])
        params = rand_params(c, dtype=c.rng.choice([torch.float32, torch.float64]))
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        grads_seq = [[torch.randn_like(p) for p in params] for _ in range(2)]
        kw = c.base_kw()
        if "fused" in kw or "foreach" in kw:  # only fused=None/True load the kernels: the other paths use fused=True here
            kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}
            kw["fused"] = True
        try:
            opt = c.call("init", lambda: c.cls(params, **kw), init=True)
            for s, grads in enumerate(grads_seq):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                step(c, opt, params, phase=f"step{s}")
        finally:  # the module docstring of cpu_build: whatever the cache holds, the kernels stay on
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if cpu_build.library() is None:
                    c.bad.append(f"kernels off after cache variant {variant}: {cpu_build.build_error()}")
        run_steps(c.cls, ref_params, {"lr": kw["lr"], "foreach": False}, grads_seq)
        close_to(c, params, ref_params, f"cache {variant}")
        if variant in REBUILT_IN_PLACE and _is_private_dir(priv):
            lib = priv / CACHE.name
            try:
                st = os.lstat(lib)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                    c.bad.append(f"cache {variant}: {lib} left as mode {oct(st.st_mode)} uid {st.st_uid}")
                else:
                    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
                    side = (priv / (CACHE.name + ".sha256")).read_bytes().split()
                    if not side or side[0].decode() != digest:
                        c.bad.append(f"cache {variant}: the library left in {priv} does not match its digest file")
            except OSError as exc:
                c.bad.append(f"cache {variant}: no library left in the private directory ({exc})")
    finally:
        if old_env is None:
            os.environ.pop("HF_AM_CACHE", None)
        else:
            os.environ["HF_AM_CACHE"] = old_env
        if CACHE.saved_state is not None:
            cpu_build._state.clear()
            cpu_build._state.update(CACHE.saved_state)
        for dirpath, dirnames, _ in os.walk(tmp):
            for d in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, d), 0o700, follow_symlinks=False)
                except (OSError, NotImplementedError):
                    pass
        try:
            os.chmod(tmp / "cache", 0o700)
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- hidden (negative control)
def case_sigsegv(c: Case):
    c.variant = "deliberate SIGSEGV"
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSEGV)


def case_exit(c: Case):
    c.variant = "deliberate exit 3"
    os._exit(3)


def case_selftest_empty_message(c: Case):
    """Must come out ``bad``: a call that raises an exception without a message."""
    c.variant = "RuntimeError()"

    def fail():
        raise RuntimeError()

    c.call("step", fail)


def case_selftest_changes_state(c: Case):
    """Must come out ``bad``: a call that changes a parameter and a state tensor, then raises."""
    c.variant = "update then raise"
    params = rand_params(c, n=1)
    opt = AMSGD(params, lr=0.1)
    warmup(c, opt, params, steps=1)

    def fail():
        with torch.no_grad():
            params[0].add_(1.0)
            opt.state[params[0]]["momentum_buffer"].mul_(2.0)
        raise ValueError("changed and raised")

    c.call("step", fail, opt, params)


CASES = {name: globals()[f"case_{name}"] for name in KINDS}


def run_case(spec: dict) -> dict:
    c = Case(spec)
    try:
        CASES[c.kind](c)
    except Stop:
        pass
    except Exception as exc:  # an error of the harness itself (outside an hf_am call)
        tb = traceback.format_exc(limit=6)
        c.bad.append(f"harness error {type(exc).__name__}: {exc} | {tb[-800:]}")
    return c.result()


def main(argv) -> int:
    faulthandler.enable()  # a fatal signal prints the Python stack to stderr (the process still dies by it)
    torch.set_num_threads(1)
    cases_file, out_file = argv[1], argv[2]
    with open(cases_file) as f:
        specs = json.load(f)
    if isinstance(specs, dict) and "range" in specs:
        specs = [case_spec(i) for i in range(*specs["range"])]
    with open(out_file, "a") as out:
        for spec in specs:
            result = run_case(spec)
            out.write(json.dumps(result, default=repr) + "\n")
            out.flush()
            os.fsync(out.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
