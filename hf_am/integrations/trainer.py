"""``--optim am_adamw`` / ``--optim am_sgd`` for the Hugging Face ``Trainer``.

:func:`register` (called by ``import hf_am``) makes three changes to
``transformers``, all idempotent:

1. ``am_adamw`` and ``am_sgd`` become members of ``OptimizerNames``, so
   ``TrainingArguments(optim="am_adamw")`` validates and every
   ``HfArgumentParser`` built *afterwards* offers ``--optim am_adamw``.
2. ``Trainer.get_optimizer_cls_and_kwargs`` (the static method the Trainer asks
   for its optimizer) answers for these two names and defers to the original
   for every other name.  Trainer flags keep their meaning (``--learning_rate``,
   ``--adam_beta1`` = ``beta_max``, ``--adam_beta2``, ``--adam_epsilon``,
   ``--weight_decay`` with the Trainer's decay/no-decay split, schedulers);
   the AM hyperparameters come from ``--optim_args`` (:func:`parse_optim_args`).
3. :class:`AMTrainerCallback` joins ``transformers.trainer.DEFAULT_CALLBACKS``,
   so every Trainer gets it ahead of its ``report_to`` integrations.  It checks
   DeepSpeed configs, wires the data-parallel group of a DeepSpeed engine into
   the optimizer, and adds the ``beta_t`` statistics (:data:`LOG_KEYS`) to the
   training logs, accumulating them on the device between logging steps.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import math
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

#: ``--optim`` names this module registers, with their ``OptimizerNames`` member names.
OPTIMIZER_NAMES: Dict[str, str] = {"am_adamw": "AM_ADAMW", "am_sgd": "AM_SGD"}

#: Keys added to every training log entry (``Trainer.state.log_history`` and every ``report_to``):
#:
#: * ``am_beta``: mean over the optimizer steps of the logging interval of the step's mean ``beta`` over scopes;
#: * ``am_beta_min`` / ``am_beta_max``: smallest / largest ``beta`` of any scope in any step of the interval;
#: * ``am_restarts``: total momentum restarts so far (summed over scopes; 0 unless ``restart_threshold`` is set).
LOG_KEYS: Tuple[str, ...] = ("am_beta", "am_beta_min", "am_beta_max", "am_restarts")

_SCOPES = ("model", "group", "tensor")

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


# ----------------------------------------------------------------------------- optim_args
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_Spec = Tuple[str, Callable[[Any], bool]]

_COMMON_SPECS: Dict[str, _Spec] = {
    "lam": ("a number >= 0 (default 0.1)", lambda v: _is_number(v) and v >= 0),
    "beta_min": ("a number in [0, beta_max] (default 0.0)", lambda v: _is_number(v) and 0 <= v < 1),
    "restart_threshold": (
        "None or a number in (0, 1] (default None)",
        lambda v: v is None or (_is_number(v) and 0 < v <= 1),
    ),
    "scope": ("one of model, group, tensor", lambda v: v in _SCOPES),
    "loss_estimate": (
        "linear (the Trainer calls step() without a loss closure, so 'exact' cannot be used with it)",
        lambda v: v == "linear",
    ),
    "foreach": ("None, true or false (default None)", lambda v: v is None or isinstance(v, bool)),
    "fused": ("None, true or false (default None: compiled CPU kernels where they apply)", lambda v: v is None or isinstance(v, bool)),
}

_SPECS: Dict[str, Dict[str, _Spec]] = {
    "am_adamw": dict(_COMMON_SPECS, scope=("one of model, group, tensor (default tensor)", _COMMON_SPECS["scope"][1])),
    "am_sgd": dict(
        _COMMON_SPECS,
        scope=("one of model, group, tensor (default model)", _COMMON_SPECS["scope"][1]),
        momentum=("a number in [0, 1): beta_max (default 0.9)", lambda v: _is_number(v) and 0 <= v < 1),
    ),
}
_FLOAT_KEYS = {"lam", "beta_min", "restart_threshold", "momentum"}


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


def _optim_value(optim) -> str:
    return str(getattr(optim, "value", optim))


def allowed_optim_args(optim: str) -> str:
    """Human-readable list of the ``--optim_args`` keys ``optim`` accepts."""
    return "; ".join(f"{key}: {desc}" for key, (desc, _) in _SPECS[_optim_value(optim)].items())


def parse_optim_args(optim, optim_args: Optional[str]) -> Dict[str, Any]:
    """Parse ``--optim_args`` (``"lam=0.1,scope=tensor,restart_threshold=None"``) for an AM optimizer.

    Returns the keyword arguments with proper types (numbers, ``None``, booleans,
    strings).  An unknown key, a repeated key, a malformed item or a bad value
    raises ``ValueError`` naming it and listing what is allowed.
    """
    name = _optim_value(optim)
    if name not in _SPECS:
        raise ValueError(f"{name!r} is not an AM optimizer name (allowed: {', '.join(_SPECS)})")
    specs = _SPECS[name]
    where = f"--optim_args for --optim {name}"
    result: Dict[str, Any] = {}
    if optim_args is None or not str(optim_args).strip():
        return result
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
        if key not in specs:
            hint = f" Set it with {_TRAINER_FLAGS[key]} instead." if key in _TRAINER_FLAGS else ""
            raise ValueError(f"{where}: unknown key {key!r}.{hint} Allowed keys: {allowed_optim_args(name)}")
        if key in result:
            raise ValueError(f"{where}: key {key!r} given twice")
        value = _convert(raw)
        desc, ok = specs[key]
        if not ok(value):
            raise ValueError(f"{where}: bad value {raw!r} for {key!r}; allowed: {desc}")
        if key in _FLOAT_KEYS and value is not None:
            value = float(value)
        result[key] = value
    return result


def optimizer_kwargs_from_args(args) -> Dict[str, Any]:
    """The keyword arguments of the AM optimizer ``args.optim`` names, from Trainer flags and ``--optim_args``."""
    name = _optim_value(args.optim)
    kwargs: Dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if name == "am_adamw":
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
        kwargs["eps"] = args.adam_epsilon
    kwargs.update(parse_optim_args(name, args.optim_args))
    return kwargs


# ------------------------------------------------------------------------- param groups
def _normalise_groups(params) -> List[Dict[str, Any]]:
    items = list(params)
    if not items:
        return []
    if not isinstance(items[0], dict):
        return [{"params": items}]
    groups = []
    for group in items:
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        groups.append({**group, "params": ps})
    return groups


def arrange_param_groups_for_deepspeed(params, scope: str) -> List[Dict[str, Any]]:
    """Param groups with which DeepSpeed ZeRO's one-``step()``-per-group computes ``scope`` exactly.

    * ``"tensor"``: one group per tensor (each keeps its group's options, e.g. its weight decay);
    * ``"group"``: the groups as they are (ZeRO steps each group whole);
    * ``"model"``: one group; several groups are merged when all their options agree,
      otherwise ``ValueError`` (DeepSpeed cannot sum one scope over several ``step()`` calls).

    Empty groups are dropped (DeepSpeed drops them too).
    """
    from hf_am import param_groups_per_tensor

    if scope not in _SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (allowed: {', '.join(_SCOPES)})")
    groups = [g for g in _normalise_groups(params) if g["params"]]
    if scope == "tensor":
        return param_groups_per_tensor(groups)
    if scope == "group" or len(groups) <= 1:
        return groups
    options = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    if all(o == options[0] for o in options[1:]):
        return [{**options[0], "params": [p for g in groups for p in g["params"]]}]
    described = "; ".join(
        f"group {i}: {len(g['params'])} tensors with "
        + ", ".join(f"{k}={v!r}" for k, v in sorted(o.items()))
        for i, (g, o) in enumerate(zip(groups, options))
    )
    raise ValueError(
        "scope='model' computes one beta over all parameters, but DeepSpeed ZeRO calls optimizer.step() once "
        f"per parameter group and these {len(groups)} groups cannot be merged because their options differ "
        f"({described}). With the Trainer this is the decay/no-decay split: use --optim_args scope=tensor or "
        "scope=group, or --weight_decay 0 so that the groups agree and are merged."
    )


def _default_scope(am_class) -> str:
    return inspect.signature(am_class.__init__).parameters["scope"].default


class _AMForTrainer(torch.optim.Optimizer):
    """What ``get_optimizer_cls_and_kwargs`` hands the Trainer for an AM name.

    It is a ``torch.optim.Optimizer`` subclass so the Trainer instantiates it
    with its param groups like any optimizer class, but instantiating it
    returns the real :class:`hf_am.AMAdamW` / :class:`hf_am.AMSGD`, built from
    param groups arranged for DeepSpeed when ``hf_am_deepspeed=True``.
    """

    am_class_name = ""

    def __new__(cls, params, *, hf_am_deepspeed: bool = False, **kwargs):
        import hf_am

        am_class = getattr(hf_am, cls.am_class_name)
        if hf_am_deepspeed:
            params = arrange_param_groups_for_deepspeed(params, kwargs.get("scope", _default_scope(am_class)))
        return am_class(params, **kwargs)

    def __init__(self, *args, **kwargs):  # pragma: no cover - __new__ never returns an instance of this class
        raise TypeError("not instantiable")


class AMAdamWForTrainer(_AMForTrainer):
    am_class_name = "AMAdamW"


class AMSGDForTrainer(_AMForTrainer):
    am_class_name = "AMSGD"


_FACTORIES = {"am_adamw": AMAdamWForTrainer, "am_sgd": AMSGDForTrainer}


# ----------------------------------------------------------------------------- DeepSpeed
def _deepspeed_config_dicts(args) -> List[dict]:
    """Every DeepSpeed config dict the Trainer/accelerate may hand to ``deepspeed.initialize``."""
    plugins = [getattr(args, "deepspeed_plugin", None)]
    try:
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:
            plugins.append(getattr(AcceleratorState(), "deepspeed_plugin", None))
    except Exception:  # pragma: no cover - accelerate missing or state half-initialised
        pass
    dicts: Dict[int, dict] = {}
    for plugin in plugins:
        if plugin is None:
            continue
        hf_ds_config = getattr(plugin, "hf_ds_config", None)
        for cfg in (getattr(plugin, "deepspeed_config", None), getattr(hf_ds_config, "config", None)):
            if isinstance(cfg, dict):
                dicts[id(cfg)] = cfg
    hf_cfg = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if isinstance(hf_cfg, dict) and dicts:
        dicts[id(hf_cfg)] = hf_cfg
    return list(dicts.values())


def uses_deepspeed(args) -> bool:
    return getattr(args, "deepspeed_plugin", None) is not None


def prepare_deepspeed_config(args) -> None:
    """Check / adapt the DeepSpeed config of a Trainer run that asked for an AM optimizer.

    * A config with its own ``"optimizer"`` section would make DeepSpeed build
      that optimizer instead: ``ValueError``.
    * ZeRO-Offload of the optimizer (``offload_optimizer.device`` cpu/nvme) refuses client
      optimizers unless ``"zero_force_ds_cpu_optimizer": false``; it is set to false when
      absent (the AM optimizer then runs on the offloaded fp32 partitions), and an explicit
      ``true`` is a ``ValueError``.
    """
    name = _optim_value(args.optim)
    for cfg in _deepspeed_config_dicts(args):
        if "optimizer" in cfg:
            raise ValueError(
                f"--optim {name} was requested, but the DeepSpeed config has its own \"optimizer\" section "
                f"({cfg['optimizer'].get('type', '?') if isinstance(cfg['optimizer'], dict) else cfg['optimizer']!r}), "
                f"with which DeepSpeed would train with that optimizer instead of {name}. Remove the \"optimizer\" "
                "section from the DeepSpeed config (a \"scheduler\" section may stay)."
            )
        zero = cfg.get("zero_optimization") or {}
        device = (zero.get("offload_optimizer") or {}).get("device")
        if str(device).lower() in ("cpu", "nvme"):
            force = cfg.get("zero_force_ds_cpu_optimizer")
            if force is True or str(force).lower() == "true":
                raise ValueError(
                    f"--optim {name} with ZeRO-Offload (offload_optimizer.device={device!r}) needs "
                    "\"zero_force_ds_cpu_optimizer\": false in the DeepSpeed config, which has it set to true "
                    "(DeepSpeed would refuse any optimizer other than DeepSpeedCPUAdam)."
                )
            if force is None:
                logger.info("hf_am: setting zero_force_ds_cpu_optimizer=false so that ZeRO-Offload accepts %s", name)
            cfg["zero_force_ds_cpu_optimizer"] = False


# ------------------------------------------------------------------ finding the optimizer
def _am_base():
    from hf_am import AMOptimizer

    return AMOptimizer


def find_am_optimizer(obj) -> Optional[torch.optim.Optimizer]:
    """The AM optimizer inside ``obj`` (accelerate/DeepSpeed wrappers are unwrapped), or ``None``."""
    base = _am_base()
    seen = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, base):
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)
    return None


def _wrapper_chain(obj) -> List[Any]:
    chain, seen = [], set()
    while obj is not None and id(obj) not in seen:
        chain.append(obj)
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)
    return chain


def _is_deepspeed_wrapped(optimizer) -> bool:
    return any(
        type(o).__module__.startswith("deepspeed.") or type(o).__name__ == "DeepSpeedOptimizerWrapper"
        for o in _wrapper_chain(optimizer)
    )


def fsdp1_process_group(model) -> Tuple[Any, bool]:
    """``(group, use_orig_params)`` of the FSDP1 (``FullyShardedDataParallel``) units in ``model``,
    or ``(None, False)`` without FSDP1.  With ``HYBRID_SHARD`` the group is the sharding group."""
    if not isinstance(model, torch.nn.Module):
        return None, False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None, False
    units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if not units:
        return None, False
    import torch.distributed as dist

    groups = {tuple(dist.get_process_group_ranks(u.process_group)): u.process_group for u in units}
    if len(groups) > 1:
        raise ValueError(
            f"FSDP1 units shard over different process groups (ranks {sorted(groups)}); an AM optimizer sums "
            "its beta formula over one group. Use one sharding group (or FSDP2, whose DTensors carry their mesh)."
        )
    return next(iter(groups.values())), all(getattr(u, "_use_orig_params", False) for u in units)


def connect_optimizer(model, optimizer) -> Optional[torch.optim.Optimizer]:
    """Wire the AM optimizer inside ``optimizer`` to the backend that shards its parameters; return it.

    * DeepSpeed: :func:`hf_am.integrations.deepspeed.attach_to_deepspeed` (ZeRO's data-parallel group,
      ZeRO-3 padding, scope checks).
    * FSDP1 with ``use_orig_params=True``: ``process_group`` = the FSDP sharding group (parameters are
      flat views of this rank's shard).  Without ``use_orig_params`` only ``scope="model"`` is exact
      (several tensors share one FlatParameter): other scopes are a ``ValueError``.
    * FSDP2 / DTensor parameters, DDP, one process: nothing to do.
    """
    am = find_am_optimizer(optimizer)
    if am is None:
        return None
    if _is_deepspeed_wrapped(optimizer):
        from hf_am.integrations.deepspeed import attach_to_deepspeed

        attach_to_deepspeed(optimizer)
        return am
    group, orig_params = fsdp1_process_group(model)
    if group is not None:
        if not orig_params and am.scope != "model":
            raise ValueError(
                f"FSDP1 without use_orig_params flattens several tensors into one FlatParameter, so "
                f"scope={am.scope!r} cannot be computed per tensor/group. Set fsdp_use_orig_params: true, "
                "use FSDP2, or --optim_args scope=model."
            )
        if am.process_group is None:
            am.process_group = group
    return am


# ------------------------------------------------------------------------------ callback
class _AMCallbackLogic:
    """The body of :class:`AMTrainerCallback` (which adds ``transformers.TrainerCallback`` as a base).

    Joins every Trainer (via ``DEFAULT_CALLBACKS``); does nothing unless the optimizer is an AM optimizer.

    * ``on_init_end``: validates ``--optim_args`` and the DeepSpeed config (see
      :func:`prepare_deepspeed_config`) as soon as the Trainer exists.
    * ``on_train_begin``: finds the AM optimizer inside the wrappers; when
      ``--optim am_*`` was requested and the optimizer in use is something else,
      raises instead of training silently with it.  Then :func:`connect_optimizer`
      (DeepSpeed: ``attach_to_deepspeed``; FSDP1: the sharding group).
    * ``on_optimizer_step``: accumulates ``optimizer.beta_summary_tensor()`` on the
      device (no host sync).
    * ``on_log``: for training logs (those with ``"loss"``), reads the accumulators
      once and adds :data:`LOG_KEYS` to the log entry before the ``report_to``
      callbacks see it.
    """

    def __init__(self):
        self._am = None
        self._reset()

    def _reset(self):
        self._count = 0
        self._sum = self._min = self._max = self._restarts = None

    def on_init_end(self, args, state, control, **kwargs):
        if _optim_value(args.optim) in OPTIMIZER_NAMES:
            parse_optim_args(args.optim, args.optim_args)
            if uses_deepspeed(args):
                prepare_deepspeed_config(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._reset()
        self._am = find_am_optimizer(optimizer)
        requested = _optim_value(args.optim)
        if self._am is None:
            if requested in OPTIMIZER_NAMES:
                inner = _wrapper_chain(optimizer)
                raise RuntimeError(
                    f"--optim {requested} was requested, but the Trainer is training with "
                    f"{type(inner[-1]).__name__ if inner else None} (wrappers: "
                    f"{[type(o).__name__ for o in inner]}). A DeepSpeed config \"optimizer\" section or an "
                    "optimizer passed to Trainer(optimizers=...) overrides --optim."
                )
            return
        connect_optimizer(model, optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._am is None:
            return
        try:
            if optimizer is not None and bool(getattr(optimizer, "step_was_skipped", False)):
                return  # fp16 overflow: the AM step did not run
        except Exception:  # a wrapper whose flag is not ready: count the step
            pass
        summary = self._am.beta_summary_tensor().detach()
        if self._count == 0:
            self._sum = summary[0].clone()
            self._min = summary[1].clone()
            self._max = summary[2].clone()
        else:
            self._sum.add_(summary[0])
            torch.minimum(self._min, summary[1], out=self._min)
            torch.maximum(self._max, summary[2], out=self._max)
        self._restarts = summary[3].clone()
        self._count += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._am is None or logs is None or "loss" not in logs or self._count == 0:
            return
        self._am.check_layout()  # logging synchronises anyway: surface a rank disagreement here
        mean, lo, hi, restarts = torch.stack([self._sum / self._count, self._min, self._max, self._restarts]).tolist()
        stats = {"am_beta": mean, "am_beta_min": lo, "am_beta_max": hi, "am_restarts": int(round(restarts))}
        logs.update(stats)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and history[-1].get("loss") == logs["loss"]:
            history[-1].update(stats)
        self._reset()


# ------------------------------------------------------------------------------ register
def _add_enum_member(enum_cls, name: str, value: str):
    """Add ``name = value`` to an existing ``(str, Enum)`` class, as if it had been declared there."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13
    if add_member is not None:
        add_member(name, member)
    else:
        enum_cls._member_map_[name] = member
        type.__setattr__(enum_cls, name, member)
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


def _patch_get_optimizer_cls_and_kwargs(trainer_cls) -> None:
    current = trainer_cls.__dict__["get_optimizer_cls_and_kwargs"]
    original = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(original, "_hf_am_original", None) is not None:
        return

    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs(args, model=None):
        name = _optim_value(args.optim)
        if name not in OPTIMIZER_NAMES:
            return original(args, model)
        kwargs = optimizer_kwargs_from_args(args)
        if uses_deepspeed(args):
            prepare_deepspeed_config(args)
            kwargs["hf_am_deepspeed"] = True
        return _FACTORIES[name], kwargs

    get_optimizer_cls_and_kwargs._hf_am_original = original
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


_CALLBACK_CLASS = None


def _callback_class():
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        from transformers import TrainerCallback

        _CALLBACK_CLASS = type(
            "AMTrainerCallback",
            (_AMCallbackLogic, TrainerCallback),
            {"__module__": __name__, "__doc__": _AMCallbackLogic.__doc__.replace("The body of", "See", 1)},
        )
    return _CALLBACK_CLASS


def __getattr__(name):  # module attribute ``AMTrainerCallback`` is built on first use
    if name == "AMTrainerCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _on_training_args(module) -> None:
    for value, member_name in OPTIMIZER_NAMES.items():
        _add_enum_member(module.OptimizerNames, member_name, value)


def _on_trainer(module) -> None:
    _patch_get_optimizer_cls_and_kwargs(module.Trainer)
    callback = _callback_class()
    if callback not in module.DEFAULT_CALLBACKS:
        module.DEFAULT_CALLBACKS.append(callback)


class _DelegatingLoader(importlib.abc.Loader):
    """Runs the real loader, then ``callback(module)``; every other attribute is the real loader's."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """Calls ``hooks[name](module)`` right after module ``name`` is first imported, then forgets it."""

    def __init__(self):
        self.hooks: Dict[str, Callable] = {}
        self._busy: set = set()

    def find_spec(self, fullname, path=None, target=None):
        hook = self.hooks.get(fullname)
        if hook is None or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        del self.hooks[fullname]
        if not self.hooks and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec.loader = _DelegatingLoader(spec.loader, hook)
        return spec


_HOOKS = _PostImportHooks()
_REGISTERED = False


def register() -> bool:
    """Register ``am_adamw`` / ``am_sgd`` with ``transformers`` (idempotent, cheap).

    Does not import ``transformers``: each change is applied as soon as the
    module it concerns (``transformers.training_args``, ``transformers.trainer``)
    is imported, or at once if it already is.  Returns ``False`` (and changes
    nothing) when ``transformers`` is not installed.  Must run before an
    ``HfArgumentParser`` is built: argparse fixes its choices then.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    if importlib.util.find_spec("transformers") is None:
        return False
    for name, hook in (("transformers.training_args", _on_training_args), ("transformers.trainer", _on_trainer)):
        module = sys.modules.get(name)
        if module is not None:
            hook(module)
        else:
            _HOOKS.hooks[name] = hook
    if _HOOKS.hooks and _HOOKS not in sys.meta_path:
        sys.meta_path.insert(0, _HOOKS)
    _REGISTERED = True
    return True


__all__ = [
    "AMAdamWForTrainer",
    "AMSGDForTrainer",
    "AMTrainerCallback",
    "LOG_KEYS",
    "OPTIMIZER_NAMES",
    "allowed_optim_args",
    "arrange_param_groups_for_deepspeed",
    "connect_optimizer",
    "fsdp1_process_group",
    "find_am_optimizer",
    "optimizer_kwargs_from_args",
    "parse_optim_args",
    "prepare_deepspeed_config",
    "register",
]
