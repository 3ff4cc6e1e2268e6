"""The Trainer callback: checks before training, wiring to the sharding backend, ``beta_t`` in the logs.

:func:`callback_class` builds ``AMTrainerCallback`` (``transformers`` is
imported only then); :func:`hf_am.integrations.trainer.register` adds it to
every Trainer.
"""

from __future__ import annotations

import logging
import os
from typing import Tuple

import torch

from .deepspeed import prepare_deepspeed_config, uses_deepspeed
from .optim_args import OPTIMIZER_CLASSES, optim_value, parse_optim_args, trainer_values_from_args
from .wrappers import connect_optimizer, find_am_optimizer, wrapper_chain

logger = logging.getLogger(__name__)

#: Keys added to every training log entry (``Trainer.state.log_history`` and every ``report_to``):
#:
#: * ``am_beta``: mean over the optimizer steps of the logging interval of the step's mean ``beta`` over scopes;
#: * ``am_beta_min`` / ``am_beta_max``: smallest / largest ``beta`` of any scope in any step of the interval;
#: * ``am_restarts``: total momentum restarts so far (summed over scopes; 0 unless ``restart_threshold`` is set);
#: * ``am_fallbacks``: total scope-steps so far whose sums were not finite (a NaN/inf gradient), where the
#:   coefficient fell back to ``beta_max`` instead of adapting (docs/algorithm.md §2, §9).
#: * ``am_beta_applied`` / ``_min`` / ``_max``: the same for the coefficient the update multiplied the old momentum
#:   by, ``(beta + lam)/(1 + lam)`` (0 on a restart step): how much memory was actually kept.
LOG_KEYS: Tuple[str, ...] = (
    "am_beta", "am_beta_min", "am_beta_max", "am_beta_applied", "am_beta_applied_min", "am_beta_applied_max",
    "am_restarts", "am_fallbacks",
)  # fmt: skip


def check_launch_is_distributed(args) -> None:
    """Refuse a multi-process launch in which the Trainer is not distributed.

    ``torchrun``/``accelerate launch`` start several processes (``WORLD_SIZE`` > 1), but on CPU
    ``TrainingArguments`` without ``--use_cpu`` sets up no distributed training: every process
    would train its own copy of the model on the whole data and exit 0.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size == 1:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but the Trainer is not distributed "
            f"(TrainingArguments.world_size == 1): each process would train its own copy. On CPU add --use_cpu to "
            "the script's arguments (for DDP, `-m hf_am.run` does the equivalent by itself); on GPUs check that every "
            "process sees a device"
        )


def _warn_if_deepspeed_was_dropped(optimizer) -> None:
    """accelerate asked for DeepSpeed, but the optimizer runs without it (accelerate on CPU without
    ``use_cpu: true`` in the DeepSpeed config trains plain DDP): still exact, but say so."""
    from .wrappers import is_deepspeed_wrapped

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not is_deepspeed_wrapped(optimizer):
        logger.warning(
            "hf_am: the accelerate config asks for DeepSpeed, but training runs without it (accelerate trains "
            "plain DDP when its state is CPU-only, e.g. ACCELERATE_USE_CPU=true; on CPU pass the script's --use_cpu "
            "instead); the AM sums are exact for the engine that runs"
        )


class _AMCallbackLogic:
    """The body of :class:`AMTrainerCallback` (which adds ``transformers.TrainerCallback`` as a base).

    Joins every Trainer (via ``DEFAULT_CALLBACKS``); does nothing unless the optimizer is an AM optimizer.

    * ``on_init_end``: validates ``--optim_args``, refuses a multi-process launch in which the
      Trainer is not distributed (:func:`check_launch_is_distributed`) and checks the DeepSpeed
      config (see :func:`prepare_deepspeed_config`) as soon as the Trainer exists.
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
        self._sum = self._min = self._max = self._totals = None

    def on_init_end(self, args, state, control, **kwargs):
        if optim_value(args.optim) in OPTIMIZER_CLASSES:
            parse_optim_args(args.optim, args.optim_args, trainer_values_from_args(args))
            check_launch_is_distributed(args)
            if uses_deepspeed(args):
                prepare_deepspeed_config(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._reset()
        self._am = find_am_optimizer(optimizer)
        requested = optim_value(args.optim)
        if self._am is None:
            if requested in OPTIMIZER_CLASSES:
                inner = wrapper_chain(optimizer)
                raise RuntimeError(
                    f"--optim {requested} was requested, but the Trainer is training with "
                    f"{type(inner[-1]).__name__ if inner else None} (wrappers: "
                    f"{[type(o).__name__ for o in inner]}). A DeepSpeed config \"optimizer\" section or an "
                    "optimizer passed to Trainer(optimizers=...) overrides --optim."
                )
            return
        _warn_if_deepspeed_was_dropped(optimizer)
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
        # (reported, applied) pairs at stride 5: views, no index tensors built every step
        means, lows, highs = summary[0:6:5], summary[1:7:5], summary[2:8:5]
        if self._count == 0:
            self._sum, self._min, self._max = means.clone(), lows.clone(), highs.clone()
        else:
            self._sum.add_(means)
            torch.minimum(self._min, lows, out=self._min)
            torch.maximum(self._max, highs, out=self._max)
        self._totals = summary[3:5].clone()  # restarts, fallbacks: running totals
        self._count += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._am is None or logs is None or "loss" not in logs or self._count == 0:
            return
        self._am.check_layout()  # logging synchronises anyway: surface a rank disagreement here
        (mean, a_mean), (lo, a_lo), (hi, a_hi), (restarts, fallbacks) = torch.stack(
            [self._sum / self._count, self._min, self._max, self._totals]
        ).tolist()
        stats = {
            "am_beta": mean,
            "am_beta_min": lo,
            "am_beta_max": hi,
            "am_beta_applied": a_mean,
            "am_beta_applied_min": a_lo,
            "am_beta_applied_max": a_hi,
            "am_restarts": int(round(restarts)),
            "am_fallbacks": int(round(fallbacks)),
        }
        logs.update(stats)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and history[-1].get("loss") == logs["loss"]:
            history[-1].update(stats)
        self._reset()


_CALLBACK_CLASS = None


def callback_class():
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
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
