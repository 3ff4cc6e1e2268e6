"""Integrations of the AM optimizers with the Hugging Face stack, one module per concern.

* :mod:`.trainer` -- registers ``--optim am_adamw`` / ``--optim am_sgd`` with ``transformers``
  (called by ``import hf_am``): ``OptimizerNames``, ``Trainer.get_optimizer_cls_and_kwargs``,
  the default callbacks;
* :mod:`.optim_args` -- ``--optim_args`` parsing, checked by the constructors' own rules;
* :mod:`.callback` -- ``AMTrainerCallback``: checks, wiring, ``beta_t`` in the logs;
* :mod:`.wrappers` -- finding the AM optimizer inside wrappers, connecting it to its backend;
* :mod:`.deepspeed` -- ``attach_to_deepspeed``, param groups for ZeRO, DeepSpeed config checks;
* :mod:`.fsdp` -- the FSDP1 sharding group.

Nothing here is imported eagerly: importing this package needs neither
``transformers`` nor ``deepspeed``.
"""
