"""``--optim_args`` for the AM optimizers: parsed here, checked by the constructors' own rules.

What each key allows and its default are read from the optimizer classes
(their :mod:`hf_am.hyperparameters` rules and ``__init__`` signatures), so the
help text and the checks cannot drift from what the constructors accept.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Optional

from ..hyperparameters import scope_rules, validate_scope

#: ``--optim`` names and the classes they build.
OPTIMIZER_CLASSES: Dict[str, str] = {"am_adamw": "AMAdamW", "am_sgd": "AMSGD"}

# Keys that would duplicate a Trainer flag: pointing at the flag is more useful than "unknown key".
_TRAINER_FLAGS = {
    "lr": "--learning_rate",
    "learning_rate": "--learning_rate",
    "betas": "--adam_beta1 (beta_max) and --adam_beta2",
    "beta_max": "--adam_beta1",
    "beta1": "--adam_beta1",
    "beta2": "--adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay",
    "process_group": "nothing (the integration sets it for DeepSpeed; DTensor parameters need none)",
}
# Group options --optim_args may set (the Trainer's own flags set the others).
_GROUP_KEYS = ("lam", "beta_min", "restart_threshold", "foreach", "fused")
_EXTRA_GROUP_KEYS = {"am_sgd": ("momentum",)}
_FLOAT_KEYS = {"lam", "beta_min", "restart_threshold", "momentum"}
_NO_CLOSURE = "linear (the Trainer calls step() without a loss closure, so 'exact' cannot be used with it)"


def optim_value(optim) -> str:
    """The ``--optim`` name as a string (``OptimizerNames`` members and plain strings alike)."""
    return str(getattr(optim, "value", optim))


def am_class(name: str):
    import hf_am

    return getattr(hf_am, OPTIMIZER_CLASSES[name])


def _defaults(cls) -> Dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _keys(name: str):
    return (*_GROUP_KEYS, *_EXTRA_GROUP_KEYS.get(name, ()), "scope", "loss_estimate")


def _descriptions(name: str) -> Dict[str, str]:
    cls = am_class(name)
    defaults = _defaults(cls)
    rules = {rule.option: rule for rule in (*cls.group_rules(), *scope_rules())}
    out = {}
    for key in _keys(name):
        if key == "loss_estimate":
            out[key] = _NO_CLOSURE
        else:
            out[key] = f"{rules[key].describe()} (default {defaults[key]!r})"
    return out


def allowed_optim_args(optim) -> str:
    """Human-readable list of the ``--optim_args`` keys ``optim`` accepts, with what each allows."""
    return "; ".join(f"{key}: {desc}" for key, desc in _descriptions(optim_value(optim)).items())


def _convert(text: str):
    """``None``/``null`` -> None, ``true``/``false`` -> bool, numbers -> int/float, else the string."""
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for number_type in (int, float):
        try:
            return number_type(text)
        except ValueError:
            pass
    return text


def _check_value(name: str, key: str, value, context: Dict[str, Any]) -> None:
    """Raise ``ValueError``/``TypeError`` when the constructor would refuse ``key=value``.

    ``context``: the other values the constructor will get (Trainer flags, the
    other ``--optim_args``), so that e.g. ``beta_min`` is checked against the real ``beta_max``.
    """
    cls = am_class(name)
    if key in ("scope", "loss_estimate"):
        if key == "loss_estimate" and value != "linear":
            raise ValueError("'exact' needs a loss closure")
        validate_scope(value if key == "scope" else _defaults(cls)["scope"], "linear")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not finite")
    group = {k: v for k, v in {**_defaults(cls), **context}.items() if k not in ("scope", "loss_estimate", "process_group")}
    group[key] = value
    cls.validate_group_options(group)


def parse_optim_args(optim, optim_args: Optional[str], trainer_values: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Parse ``--optim_args`` (``"lam=0.1,scope=tensor,restart_threshold=None"``) for an AM optimizer.

    Returns the keyword arguments with proper types (numbers, ``None``, booleans,
    strings).  An unknown key, a repeated key, a malformed item or a value the
    constructor would refuse (given ``trainer_values``, the keyword arguments the
    Trainer's own flags set, see :func:`trainer_values_from_args`) raises
    ``ValueError`` naming it and listing what is allowed.
    """
    name = optim_value(optim)
    if name not in OPTIMIZER_CLASSES:
        raise ValueError(f"{name!r} is not an AM optimizer name (allowed: {', '.join(OPTIMIZER_CLASSES)})")
    where = f"--optim_args for --optim {name}"
    result: Dict[str, Any] = {}
    raws: Dict[str, str] = {}
    if optim_args is None or not str(optim_args).strip():
        return result
    keys = _keys(name)
    for item in str(optim_args).split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(
                f"{where}: malformed item {item!r}; expected key=value. Allowed: {allowed_optim_args(name)}"
            )
        if key not in keys:
            hint = f" Set it with {_TRAINER_FLAGS[key]} instead." if key in _TRAINER_FLAGS else ""
            raise ValueError(f"{where}: unknown key {key!r}.{hint} Allowed keys: {allowed_optim_args(name)}")
        if key in result:
            raise ValueError(f"{where}: key {key!r} given twice")
        result[key] = _convert(raw)
        raws[key] = raw
    trainer_values = dict(trainer_values or {})
    for key, value in result.items():
        # beta_min is bounded by beta_max: --adam_beta1 (in trainer_values) or momentum (in the same string)
        context = {**trainer_values, **({"momentum": result["momentum"]} if key == "beta_min" and "momentum" in result else {})}
        try:
            _check_value(name, key, value, context)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{where}: bad value {raws[key]!r} for {key!r} ({exc}); allowed: {_descriptions(name)[key]}"
            ) from None
    return {k: float(v) if k in _FLOAT_KEYS and v is not None else v for k, v in result.items()}


def trainer_values_from_args(args) -> Dict[str, Any]:
    """The AM optimizer's keyword arguments that Trainer flags set (``--learning_rate``, ``--adam_beta1`` ...)."""
    values: Dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if optim_value(args.optim) == "am_adamw":
        values["betas"] = (args.adam_beta1, args.adam_beta2)
        values["eps"] = args.adam_epsilon
    return values


def optimizer_kwargs_from_args(args) -> Dict[str, Any]:
    """The keyword arguments of the AM optimizer ``args.optim`` names, from Trainer flags and ``--optim_args``."""
    kwargs = trainer_values_from_args(args)
    kwargs.update(parse_optim_args(args.optim, args.optim_args, kwargs))
    return kwargs
