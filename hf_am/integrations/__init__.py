"""Integrations of the AM optimizers with the Hugging Face stack.

* :mod:`hf_am.integrations.trainer` -- ``--optim am_adamw`` / ``--optim am_sgd``
  for ``transformers.Trainer`` (registered by ``import hf_am``), ``beta_t``
  statistics in the Trainer logs, DeepSpeed/FSDP wiring.
* :mod:`hf_am.integrations.deepspeed` -- helpers for DeepSpeed ZeRO engines.

Nothing here is imported eagerly: importing this package needs neither
``transformers`` nor ``deepspeed``.
"""
