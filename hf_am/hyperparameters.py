"""Hyperparameters of the AM optimizers: their named type and the one table of allowed values.

Every range is written once, here, as a :class:`Rule`.  The optimizers'
constructors and ``add_param_group`` check param groups with
:func:`validate_group`; ``--optim_args`` (:mod:`hf_am.integrations.optim_args`)
describes and checks its values through the same rules, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import math
import numbers

import torch

#: ``scope=`` values (docs/algorithm.md §4).
SCOPES = ("model", "group", "tensor")
#: ``loss_estimate=`` values (docs/algorithm.md §3).
LOSS_ESTIMATES = ("linear", "exact")


class Hyperparameters(NamedTuple):
    """The AM settings one scope's coefficient depends on (docs/algorithm.md §2, §7)."""

    lam: float  #: the paper's lambda: pull towards the previous step
    beta_min: float  #: lower clip of the adaptive coefficient
    beta_max: float  #: upper clip (``betas[0]`` of AM-AdamW, ``momentum`` of AM-SGD)
    restart_threshold: Optional[float]  #: ``None``, or the Restart variant's threshold


def has_restart_variant(group_or_scope) -> bool:
    """Whether a param group (its dict) or a scope (its :class:`Hyperparameters`) uses the Restart
    variant: the one test for it, since the update, the C kernels' call merging, the statistics and the
    coefficient formula each branch on it (a fact of the options, so branching costs no host sync)."""
    if isinstance(group_or_scope, Hyperparameters):
        return group_or_scope.restart_threshold is not None
    return group_or_scope["restart_threshold"] is not None


def is_real(value) -> bool:
    """A finite real number: a Python or numpy int/float (not a bool), or a one-element real tensor.

    Non-finite values are refused: ``lr``, ``lam``, ``eps`` or ``weight_decay`` of
    ``inf`` make every parameter NaN after one step.  Reading a tensor here may
    synchronise with its device; this runs in the constructor and
    ``add_param_group`` only, never in ``step()``.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.device.type == "meta":
            return False
        return math.isfinite(float(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_":
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an int beyond the float range
            return False
    return False


def _non_finite(value) -> bool:
    if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.device.type == "meta"):
        return False
    try:
        return isinstance(value, (numbers.Real, torch.Tensor)) and not isinstance(value, bool) and not math.isfinite(float(value))
    except OverflowError:
        return True
    except (TypeError, ValueError, RuntimeError):
        return False


def normalise_number(value):
    """numpy scalars and one-element tensors (other than a tensor ``lr``) become Python floats, so
    that arithmetic inside ``step()`` neither synchronises nor meets numpy's operator rules."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.device.type != "meta":
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


@dataclass(frozen=True)
class Rule:
    """One checked value: where it lives, how messages name it, what is allowed.

    ``read`` takes the param group and returns the value; ``ok(value, group)``
    decides; ``allowed`` may name ``{beta_max}``, filled in from the group.
    ``error`` is the exception type (``TypeError`` for wrong kinds of value).
    """

    option: str  # the constructor argument / --optim_args key
    label: str  # the name in messages
    allowed: str
    ok: Callable[[Any, Mapping[str, Any]], bool]
    read: Callable[[Mapping[str, Any]], Any]
    error: type = ValueError

    def check(self, group: Mapping[str, Any], beta_max: float) -> None:
        value = self.read(group)
        if not self.ok(value, group):
            allowed = self.allowed.format(beta_max=beta_max)
            if _non_finite(value):
                allowed += ", and finite"
            raise self.error(f"Invalid {self.label}: {value!r} (allowed: {allowed})")

    def describe(self) -> str:
        """The allowed values without a group at hand (``beta_max`` stays a name)."""
        return self.allowed.replace(" = {beta_max}", "")


def _key(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda group: group.get(name)


def _optional_bool(value, group) -> bool:
    return value is None or isinstance(value, bool)


def beta_max_rule(option: str, read: Callable[[Mapping[str, Any]], Any]) -> Rule:
    return Rule(option, f"{option} (beta_max)", "0 <= beta_max < 1", lambda v, g: is_real(v) and 0.0 <= v < 1.0, read)


def _lr_ok(lr, group) -> bool:
    if isinstance(lr, torch.Tensor):
        return True  # checked by validate_group (a tensor lr is moved by schedulers)
    return is_real(lr) and lr >= 0.0


LR = Rule("lr", "learning rate", "lr >= 0", _lr_ok, _key("lr"))
WEIGHT_DECAY = Rule("weight_decay", "weight_decay", "weight_decay >= 0", lambda v, g: is_real(v) and v >= 0.0, _key("weight_decay"))
LAM = Rule("lam", "lam", "lam >= 0", lambda v, g: is_real(v) and v >= 0.0, _key("lam"))
FOREACH = Rule("foreach", "foreach", "None, True, False", _optional_bool, _key("foreach"), TypeError)
FUSED = Rule("fused", "fused", "None, True, False", _optional_bool, _key("fused"), TypeError)
MAXIMIZE = Rule("maximize", "maximize", "True, False", lambda v, g: isinstance(v, bool), lambda g: g.get("maximize", False), TypeError)
RESTART_THRESHOLD = Rule(
    "restart_threshold",
    "restart_threshold",
    "None or 0 < restart_threshold <= 1",
    lambda v, g: v is None or (is_real(v) and 0.0 < v <= 1.0),
    _key("restart_threshold"),
)


def beta_min_rule(beta_max_of: Callable[[Mapping[str, Any]], float]) -> Rule:
    return Rule(
        "beta_min",
        "beta_min",
        "0 <= beta_min <= beta_max = {beta_max}",
        lambda v, g: is_real(v) and 0.0 <= v <= beta_max_of(g),
        _key("beta_min"),
    )


def validate_group(group: Dict[str, Any], rules: Sequence[Rule], beta_max: float) -> None:
    """Check a param group against ``rules`` in order; the first failure raises, naming value and range.

    Numbers are normalised first (:func:`normalise_number`); a tensor ``lr`` stays a
    tensor (schedulers update it in place) but must hold one finite real number.
    """
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "meta":
            raise ValueError("Invalid learning rate: a tensor lr on the meta device has no value (allowed: lr >= 0, finite)")
        if lr.numel() != 1:
            raise ValueError(f"Invalid learning rate: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not is_real(lr) or float(lr) < 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (allowed: lr >= 0, finite)")
    for key in ("lam", "beta_min", "weight_decay", "eps", "momentum", "restart_threshold"):
        if key in group:
            group[key] = normalise_number(group[key])
    if not isinstance(lr, torch.Tensor):
        group["lr"] = normalise_number(lr)
    if isinstance(group.get("betas"), tuple):
        group["betas"] = tuple(normalise_number(b) for b in group["betas"])
    for rule in rules:
        rule.check(group, beta_max)
        if rule is FUSED and group.get("fused") and group.get("foreach") is not None:
            raise ValueError(
                f"fused=True and foreach={group['foreach']!r} exclude each other: fused picks the compiled "
                "kernels (C on CPU, Triton on CUDA), foreach the multi-tensor (True) or per-tensor (False) path"
            )


def validate_scope(scope, loss_estimate) -> None:
    """Constructor-level options (one value for the whole optimizer)."""
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (allowed: {', '.join(map(repr, SCOPES))})")
    if loss_estimate not in LOSS_ESTIMATES:
        raise ValueError(
            f"Invalid loss_estimate: {loss_estimate!r} (allowed: {', '.join(map(repr, LOSS_ESTIMATES))})"
        )
    if loss_estimate == "exact" and scope != "model":
        raise ValueError(
            f"loss_estimate='exact' needs scope='model', got scope={scope!r}: the loss is one "
            "number for the whole model, so only a model-wide scope has an exact loss difference"
        )


def scope_rules() -> Tuple[Rule, Rule]:
    """``scope`` and ``loss_estimate`` as rules, for describing them (``--optim_args``)."""
    scopes = ", ".join(map(repr, SCOPES))
    estimates = ", ".join(map(repr, LOSS_ESTIMATES))
    return (
        Rule("scope", "scope", scopes, lambda v, g: v in SCOPES, _key("scope")),
        Rule("loss_estimate", "loss_estimate", estimates, lambda v, g: v in LOSS_ESTIMATES, _key("loss_estimate")),
    )


#: torch.optim.AdamW / SGD keyword arguments the AM optimizers do not offer, and why.
UNSUPPORTED_TORCH_OPTIONS: Dict[str, str] = {
    "amsgrad": "AMSGrad's running maximum of v would change the metric D between the two phases of a step; "
    "it is not part of the AM method",
    "nesterov": "the AM coefficient is chosen for the heavy-ball update of the paper; a Nesterov look-ahead "
    "is a different model",
    "dampening": "AM-SGD always uses the damped form d <- b d + (1 - b) g (what SGD(momentum=b, dampening=b) "
    "computes); the coefficient b is chosen every step",
    "differentiable": "the closed-form coefficient and the compiled kernels run under torch.no_grad()",
    "capturable": "CUDA-graph capture needs no flag here: on a CUDA device step() keeps its step counts, "
    "coefficients and restart flags on the device and can be captured as it is (torch.cuda.graph; make lr a "
    "CUDA tensor to change it between replays; docs/algorithm.md §10)",
    "decoupled_weight_decay": "AM-AdamW's weight decay is always decoupled, AM-SGD's always coupled",
}


def refuse_unsupported(optimizer_name: str, options: Mapping[str, Any]) -> None:
    """``ValueError`` for a torch option set to something other than its off value, saying why."""
    for key, value in options.items():
        if value is not None and value is not False:
            raise ValueError(f"{optimizer_name} does not support {key}={value!r}: {UNSUPPORTED_TORCH_OPTIONS[key]}")


def revalidate_changed_options(optimizer) -> None:
    """Options written into ``param_groups`` after construction (a scheduler's new lr, a user's edit)
    are checked again before a step uses them, so a bad one raises before anything changes.
    Unchanged options (same values, same tensor objects) cost one tuple comparison per group.  A new
    plain-float ``lr`` and nothing else (what an lr scheduler writes every step under the Trainer) is
    checked on its own (:func:`_only_a_valid_float_lr_changed`): the whole rule table, ~75 us a group
    on CPU, would judge it by the same one rule."""
    seen = optimizer.__dict__.setdefault("_validated_options", {})
    for group in optimizer.param_groups:
        key = tuple(
            (k, ("tensor", id(v), v.dtype, v.shape, v.device) if isinstance(v, torch.Tensor) else v)
            for k, v in group.items()
            if k != "params" and not k.startswith("am_")
        )
        before = seen.get(id(group))
        if before != key:
            if not _only_a_valid_float_lr_changed(before, key):
                optimizer.validate_group_options(group)
            seen[id(group)] = key


def _only_a_valid_float_lr_changed(before, key) -> bool:
    """Whether option tuples ``before`` and ``key`` (as :func:`revalidate_changed_options` builds them)
    differ in ``lr`` alone, to a Python float that :data:`LR` accepts (finite, ``>= 0``).  No other rule
    reads ``lr``, and :func:`validate_group` leaves a float ``lr`` as it is, so this is the same verdict
    as validating the group again.  Anything else (a tensor, an int, numpy, a NaN, another key) is
    validated in full."""
    if before is None or len(before) != len(key):
        return False
    for (old_name, old_value), (name, value) in zip(before, key):
        if old_name != name:
            return False
        if name == "lr":
            # _lr_ok for a Python float, inline: its isinstance checks (torch.Tensor's metaclass,
            # numbers.Real) cost ~7 us a group per step; tests/unit/test_option_recheck.py holds the two equal
            if type(value) is not float or not (0.0 <= value < math.inf):
                return False
        elif (old_value,) != (value,):  # as the tuples compare: identity, then ==
            return False
    return True
