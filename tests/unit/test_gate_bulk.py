"""The bulk checks in front of the per-tensor definitions accept nothing the definitions refuse.

Three places read the common case in bulk (lists of shapes, dtypes and devices compared whole) and hand
everything else to their per-tensor definition, which writes the messages:

* the gate (``hf_am.gate``): ``_all_fit`` in front of ``_walk``;
* the kernels' tensor check (``hf_am.kernels.interface``): ``_all_contiguous_alike`` in front of
  ``_first_problem``;
* planning (``hf_am.planning``): ``_plain_gradients`` in front of ``plan_step``'s loop over parameters.

Each table row is a way the tensors can differ from what a step expects.  The invariant: where the bulk
check accepts, the definition accepts too; rows the definition refuses must make the bulk check decline
(a bulk check that skipped a comparison would accept them and fail here), and the undamaged case must be
accepted in bulk (or the fast path would never run).
"""

from __future__ import annotations

import pytest
import torch

from helpers import loss_fn, make_batches, make_model, train
from hf_am import AMAdamW, AMSGD, planning
from hf_am import gate
from hf_am.kernels import interface

OPTIMIZERS = {"am_adamw": AMAdamW, "am_sgd": AMSGD}


def _trained(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    train(model, opt, make_batches(3))  # state exists and the walk has accepted it once
    for p in model.parameters():
        p.grad = None
    loss_fn(model, make_batches(1)[0]).backward()
    return model, opt


def _set_state(key):
    def damage(opt, plan):
        opt.state[plan.params[1]][key] = torch.zeros(3)
    return damage


def _state_dtype(opt, plan):
    name = opt.state_tensor_names[0]
    state = opt.state[plan.params[2]]
    state[name] = state[name].double()


def _state_not_a_tensor(opt, plan):
    opt.state[plan.params[0]][opt.state_tensor_names[0]] = 0.0


def _scalar(value):
    def damage(opt, plan):
        opt.state[plan.params[3]]["step"] = value
    return damage


def _scalar_deleted(opt, plan):
    del opt.state[plan.params[1]][opt.required_scalar_state[-1]]


def _grad(make):
    def damage(opt, plan):
        plan.local_grads[2] = make(plan.local_params[2])
    return damage


def _expanded_param(opt, plan):
    p = plan.local_params[1]
    plan.local_params[1] = torch.zeros(1).expand(p.shape)


def _freed(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s values one element into a storage that is then freed (data pointer not NULL)."""
    base = torch.zeros(t.numel() + 1, dtype=t.dtype)
    view = base[1:].view(t.shape)
    base.untyped_storage().resize_(0)
    return view


def _one_element_past(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s shape whose last element lies just past its storage (shrunk by one element)."""
    base = torch.zeros(t.numel() + 1, dtype=t.dtype)
    view = base[1:].view(t.shape)
    base.untyped_storage().resize_(t.numel() * t.element_size())
    return view


def _state_storage_freed(opt, plan):
    opt.state[plan.params[2]][opt.state_tensor_names[0]].untyped_storage().resize_(0)


def _scalar_replaced_by_a_freed_view(opt, plan):
    opt.state[plan.params[3]]["step"] = _freed(opt.state[plan.params[3]]["step"])  # another object: the walk


def _param_storage_freed(opt, plan):
    plan.local_params[1] = _freed(plan.local_params[1])


def _state_sparse(opt, plan):
    name = opt.state_tensor_names[0]
    state = opt.state[plan.params[1]]
    state[name] = state[name].to_sparse()


# (name, damage, the walk refuses it)
DAMAGES = [
    ("none", lambda opt, plan: None, False),
    ("grad_other_shape", _grad(lambda p: torch.zeros(p.numel() + 1)), True),
    ("grad_other_dtype", _grad(lambda p: torch.zeros_like(p, dtype=torch.float64)), True),
    ("grad_transposed_same_shape", _grad(lambda p: torch.zeros(tuple(reversed(p.shape))).t() if p.dim() == 2 else p.clone()), False),
    ("state_tensor_other_shape", lambda opt, plan: _set_state(opt.state_tensor_names[0])(opt, plan), True),
    ("state_tensor_other_dtype", _state_dtype, True),
    ("state_tensor_not_a_tensor", _state_not_a_tensor, True),
    ("scalar_a_number", _scalar(3), True),
    ("scalar_two_elements", _scalar(torch.zeros(2)), True),
    ("scalar_an_integer_tensor", _scalar(torch.tensor(3)), True),
    ("scalar_an_equal_new_tensor", lambda opt, plan: _scalar(opt.state[plan.params[3]]["step"].clone())(opt, plan), False),
    ("scalar_deleted", _scalar_deleted, True),
    ("one_state_emptied", lambda opt, plan: opt.state[plan.params[4]].clear(), False),
    ("expanded_parameter", _expanded_param, True),
    ("grad_storage_freed", _grad(_freed), True),
    ("param_storage_freed", _param_storage_freed, True),
    ("state_tensor_storage_freed", _state_storage_freed, True),
    ("state_tensor_sparse", _state_sparse, True),
    ("scalar_replaced_by_a_freed_view", _scalar_replaced_by_a_freed_view, True),
    ("grad_one_element_past_its_storage", _grad(_one_element_past), True),
    ("grad_view_inside_a_larger_storage", _grad(lambda p: torch.zeros(p.numel() + 5)[3:-2].view(p.shape)), False),
]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", DAMAGES, ids=[row[0] for row in DAMAGES])
def test_the_gate_accepts_in_bulk_only_what_its_walk_accepts(name, case):
    _, damage, refused = case
    model, opt = _trained(name)
    (plan,), _ = planning.plan_step(opt)
    damage(opt, plan)
    accepted_in_bulk = gate._all_fit(opt, plan)
    try:
        gate._walk(opt, plan)
        walk_refused = False
    except RuntimeError as exc:
        walk_refused = True
        assert "Nothing was changed" in str(exc)
    assert walk_refused == refused, "the table's expectation of the walk is wrong"
    if refused:
        assert not accepted_in_bulk, "the bulk check accepted what the walk refuses"
    if case[0] == "none":
        assert accepted_in_bulk, "the common case never takes the bulk check"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_replaced_scalar_is_accepted_in_bulk_again_once_the_walk_has_seen_it(name):
    model, opt = _trained(name)
    (plan,), _ = planning.plan_step(opt)
    p = plan.params[0]
    opt.state[p]["step"] = opt.state[p]["step"].clone()
    assert not gate._all_fit(opt, plan)  # another object: the walk checks it ...
    gate.check_plan_tensors(opt, plan)
    assert gate._all_fit(opt, plan)  # ... and the bulk check takes it from then on
    opt.state[p]["step"] = 7  # a number where the walk accepted a tensor: refused again
    assert not gate._all_fit(opt, plan)
    with pytest.raises(RuntimeError, match=r"state 'step' has 7"):
        gate.check_plan_tensors(opt, plan)


def _lists(*specs):
    return [[spec() for _ in range(3)] for spec in specs]


TENSOR_LISTS = {
    "contiguous": lambda: _lists(lambda: torch.zeros(4, 5), lambda: torch.zeros(4, 5)),
    "other_dtype": lambda: _lists(lambda: torch.zeros(4, 5), lambda: torch.zeros(4, 5, dtype=torch.float64)),
    "bfloat16": lambda: _lists(lambda: torch.zeros(4, 5, dtype=torch.bfloat16), lambda: torch.zeros(4, 5, dtype=torch.bfloat16)),
    "other_shape": lambda: _lists(lambda: torch.zeros(4, 5), lambda: torch.zeros(5, 4)),
    "other_length": lambda: [[torch.zeros(2)] * 3, [torch.zeros(2)] * 2],
    "strided": lambda: _lists(lambda: torch.zeros(4, 10)[:, ::2], lambda: torch.zeros(4, 10)[:, ::2]),
    "transposed_gradient": lambda: _lists(lambda: torch.zeros(4, 5), lambda: torch.zeros(5, 4).t()),
    "channels_last_everywhere": lambda: _lists(
        lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last),
        lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last),
    ),
    "meta_device": lambda: _lists(lambda: torch.zeros(4, 5, device="meta"), lambda: torch.zeros(4, 5, device="meta")),
    "one_on_meta": lambda: [[torch.zeros(3)], [torch.zeros(3, device="meta")]],
}


@pytest.mark.parametrize("case", sorted(TENSOR_LISTS))
def test_the_kernels_tensor_check_accepts_in_bulk_only_what_its_definition_accepts(case):
    lists = TENSOR_LISTS[case]()
    tensors = [t for lst in lists for t in lst]
    dtypes = (torch.float32, torch.float64)
    definition = interface._first_problem(lists, tensors, dtypes, "cpu")
    if interface._all_contiguous_alike(lists, tensors, dtypes, "cpu"):
        assert definition is None, f"accepted in bulk, but the definition says: {definition}"
    expected_none = case in ("contiguous", "channels_last_everywhere")
    assert (definition is None) == expected_none, definition
    assert interface.tensor_problem(lists, (torch.float32, torch.float64), "cpu") == definition
    if case == "contiguous":
        assert interface._all_contiguous_alike(lists, tensors, dtypes, "cpu")


def _plans_as_lists(opt):
    plans, layout = planning.plan_step(opt)
    return [
        (p.group_index, p.params, p.local_params, [g.data_ptr() for g in p.local_grads], p.positions, p.indices, p.keys, p.scope_ids)
        for p in plans
    ], layout.signature


GROUPINGS = {
    "plain": lambda model: dict(params=list(model.parameters())),
    "one_without_gradient": lambda model: dict(params=list(model.parameters()), drop_grad=1),
    "maximize": lambda model: dict(params=list(model.parameters()), maximize=True),
}


@pytest.mark.parametrize("scope", ["tensor", "group", "model"])
@pytest.mark.parametrize("case", sorted(GROUPINGS))
def test_planning_in_bulk_gives_the_lists_of_its_loop(case, scope, monkeypatch):
    model = make_model()
    spec = GROUPINGS[case](model)
    drop = spec.pop("drop_grad", None)
    params = spec.pop("params")
    groups = [dict(params=params[:2], **spec), dict(params=params[2:], weight_decay=0.0, **spec)]
    opt = AMAdamW(groups, lr=1e-2, scope=scope, beta_min=0.9 if scope == "model" else 0.0)
    loss_fn(model, make_batches(1)[0]).backward()
    if drop is not None:
        params[drop].grad = None
    bulk = _plans_as_lists(opt)
    used_bulk = planning._plain_gradients(opt.param_groups[0]) is not None
    assert used_bulk == (case == "plain")
    monkeypatch.setattr(planning, "_plain_gradients", lambda group: None)  # the loop, the definition
    loop = _plans_as_lists(opt)
    if case == "maximize":  # the loop negates into new tensors: compare all but the gradients' storage
        bulk = ([row[:3] + row[4:] for row in bulk[0]], bulk[1])
        loop = ([row[:3] + row[4:] for row in loop[0]], loop[1])
    assert bulk == loop


def test_planning_leaves_sparse_and_complex_gradients_to_its_loop():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    assert planning._plain_gradients({"params": [p]}) is None
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        AMAdamW([p], lr=1e-2).step()
    q = torch.nn.Parameter(torch.zeros(3))
    opt = AMAdamW([q], lr=1e-2)
    q.data = torch.zeros(3, dtype=torch.complex64)  # became complex after the optimizer checked it
    q.grad = torch.zeros(3, dtype=torch.complex64)
    assert planning._plain_gradients({"params": [q]}) is None
    with pytest.raises(TypeError, match="real tensors only"):
        opt.step()


MIRRORED_FIRST_LISTS = {
    "float32": lambda: [torch.zeros(4, 5), torch.zeros(3)],
    "float64": lambda: [torch.zeros(4, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)],
    "mixed_dtypes": lambda: [torch.zeros(4, 5), torch.zeros(3, dtype=torch.float64)],
    "bfloat16": lambda: [torch.zeros(4, 5, dtype=torch.bfloat16)],
    "meta_device": lambda: [torch.zeros(4, 5, device="meta")],
    "one_on_meta": lambda: [torch.zeros(3), torch.zeros(3, device="meta")],
    "empty_tensor": lambda: [torch.zeros(0), torch.zeros(2)],
}


@pytest.mark.parametrize("case", sorted(MIRRORED_FIRST_LISTS))
@pytest.mark.parametrize("n_lists", [1, 2, 4])
def test_mirrored_lists_get_the_answer_all_lists_give(case, n_lists):
    """What the gate vouches for (every later list contiguous, with the first list's shapes, dtypes and
    devices) makes the first list's answer the answer of all lists, refusals and their words included."""
    first = MIRRORED_FIRST_LISTS[case]()
    lists = [first] + [[torch.empty_like(t) for t in first] for _ in range(n_lists - 1)]
    dtypes = (torch.float32, torch.float64)
    assert interface.tensor_problem(lists, dtypes, "cpu", mirrored=True) == interface.tensor_problem(lists, dtypes, "cpu")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fused", [None, False])
def test_planning_on_the_gates_lists_chooses_the_path_of_all_lists(name, fused):
    """Where the gate accepted a plan in bulk, planning hands the path choice the state lists the gate read
    (the same tensor objects state_lists() gathers) and says they mirror the parameters: the path and its
    reason are those of the full lists.  A plan the gate walked (a replaced scalar) gathers nothing."""
    model, opt = _trained(name)
    for group in opt.param_groups:
        group["fused"] = fused
    (plan,), _ = planning.plan_step(opt)
    expected = planning.state_lists(opt, plan.params)
    assert plan.state_tensors is not None and len(plan.state_tensors) == len(expected) >= 1
    assert all(a is b for got, want in zip(plan.state_tensors, expected) for a, b in zip(got, want))
    full = planning.choose_path(plan.group, 0, [plan.local_params, plan.local_grads, *expected])
    assert (plan.path, plan.kernels, plan.why) == full
    p = plan.params[0]
    opt.state[p]["step"] = opt.state[p]["step"].clone()  # another object: the walk checks it this step
    (walked,), _ = planning.plan_step(opt)
    assert walked.state_tensors is None
    assert (walked.path, walked.kernels, walked.why) == full


def test_a_step_that_creates_state_for_some_parameters_only():
    """A group whose parameters partly lack state (one dropped from the state) is walked, gathers no lists,
    and the missing state is created: the step runs and every parameter has its moments."""
    model = make_model()
    params = list(model.parameters())
    opt = AMAdamW(params, lr=1e-2)
    train(model, opt, make_batches(2))
    opt.state.pop(params[-1])  # state for all but the last
    loss_fn(model, make_batches(1)[0]).backward()
    (plan,), _ = planning.plan_step(opt)
    assert plan.state_tensors is None
    opt.step()
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(opt.state[p]) for p in params)
