"""``--optim am_adamw`` / ``--optim am_sgd`` for the Hugging Face ``Trainer``.

:func:`register` (called by ``import hf_am``) makes three changes to
``transformers``, all idempotent:

1. ``am_adamw`` and ``am_sgd`` become members of ``OptimizerNames``, so
   ``TrainingArguments(optim="am_adamw")`` validates and every
   ``HfArgumentParser`` built *afterwards* offers ``--optim am_adamw``; and
   ``TrainingArguments.__post_init__`` checks ``--optim_args`` of an AM optimizer, so a bad
   value fails when the arguments are parsed, before any data is loaded.
2. ``Trainer.get_optimizer_cls_and_kwargs`` (the static method the Trainer asks
   for its optimizer) answers for these two names and defers to the original
   for every other name.  Trainer flags keep their meaning (``--learning_rate``,
   ``--adam_beta1`` = ``beta_max``, ``--adam_beta2``, ``--adam_epsilon``,
   ``--weight_decay`` with the Trainer's decay/no-decay split, schedulers);
   the AM hyperparameters come from ``--optim_args`` (:func:`parse_optim_args`).
3. :class:`~hf_am.integrations.callback.AMTrainerCallback` joins ``transformers.trainer.DEFAULT_CALLBACKS``,
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
import sys
from typing import Callable, Dict

import torch

from .callback import callback_class
from .optim_args import optim_value, optimizer_kwargs_from_args, parse_optim_args, trainer_values_from_args

#: ``--optim`` names this module registers, with their ``OptimizerNames`` member names.
OPTIMIZER_NAMES: Dict[str, str] = {"am_adamw": "AM_ADAMW", "am_sgd": "AM_SGD"}


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
            from .deepspeed import arrange_param_groups_for_deepspeed

            params = arrange_param_groups_for_deepspeed(params, kwargs.get("scope", _default_scope(am_class)))
        return am_class(params, **kwargs)

    def __init__(self, *args, **kwargs):  # pragma: no cover - __new__ never returns an instance of this class
        raise TypeError("not instantiable")


class AMAdamWForTrainer(_AMForTrainer):
    am_class_name = "AMAdamW"


class AMSGDForTrainer(_AMForTrainer):
    am_class_name = "AMSGD"


_FACTORIES = {"am_adamw": AMAdamWForTrainer, "am_sgd": AMSGDForTrainer}


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
        name = optim_value(args.optim)
        if name not in OPTIMIZER_NAMES:
            return original(args, model)
        from .deepspeed import prepare_deepspeed_config, uses_deepspeed

        kwargs = optimizer_kwargs_from_args(args)
        if uses_deepspeed(args):
            prepare_deepspeed_config(args)
            kwargs["hf_am_deepspeed"] = True
        return _FACTORIES[name], kwargs

    get_optimizer_cls_and_kwargs._hf_am_original = original
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def __getattr__(name):  # ``AMTrainerCallback`` (documented here) is built on first use
    if name == "AMTrainerCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _on_training_args(module) -> None:
    for value, member_name in OPTIMIZER_NAMES.items():
        _add_enum_member(module.OptimizerNames, member_name, value)
    _patch_post_init(module.TrainingArguments)


def _patch_post_init(args_cls) -> None:
    """``TrainingArguments(optim="am_adamw", optim_args="lam=-1")`` raises while the arguments are
    built, before a script loads or tokenizes any data (subclasses inherit the check)."""
    original = args_cls.__post_init__
    if getattr(original, "_hf_am_original", None) is not None:
        return

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if optim_value(self.optim) in OPTIMIZER_NAMES:
            parse_optim_args(self.optim, self.optim_args, trainer_values_from_args(self))

    __post_init__._hf_am_original = original
    args_cls.__post_init__ = __post_init__


def _on_trainer(module) -> None:
    _patch_get_optimizer_cls_and_kwargs(module.Trainer)
    callback = callback_class()
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


__all__ = ["AMAdamWForTrainer", "AMSGDForTrainer", "AMTrainerCallback", "OPTIMIZER_NAMES", "register"]
