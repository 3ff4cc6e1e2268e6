"""Run an unmodified training script with ``--optim am_adamw`` / ``am_sgd`` available.

    python -m hf_am.run script.py ARGS...
    python -m hf_am.run -m package.module ARGS...
    accelerate launch [accelerate options] -m hf_am.run script.py ARGS...
    torchrun --nproc_per_node N -m hf_am.run script.py ARGS...
    hf-am-run script.py ARGS...                     (console script)

``import hf_am`` registers the optimizer names with ``transformers`` before the
script builds its ``HfArgumentParser``; then the script runs as ``__main__``
with ``sys.argv`` = ``[script.py, ARGS...]``, exactly as ``python script.py ARGS``
would run it.  Launched as several CPU processes (no CUDA), it sets
``ACCELERATE_USE_CPU=true`` so that the Trainer is distributed without ``--use_cpu`` (not for
DeepSpeed/FSDP launches, which accelerate would turn into DDP: those need ``--use_cpu`` on CPU).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

USAGE = __doc__.split("\n\n")[1].rstrip()


def _distribute_cpu_launches() -> None:
    """Several CPU processes (torchrun/accelerate, no CUDA): make the Trainer distribute them.

    Without ``--use_cpu`` a CPU ``TrainingArguments`` sets up no distributed training, and each
    process would train its own copy; ``ACCELERATE_USE_CPU=true`` (what ``--use_cpu`` sets) makes it
    use the gloo group the launcher prepared, so unmodified scripts need no extra flag.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return
    if any(os.environ.get(k, "").lower() == "true" for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")):
        # accelerate's CPU state would replace DeepSpeed/FSDP by plain DDP; these launches need the
        # script's own --use_cpu, which the AM callback names if it is missing
        return
    try:
        import torch

        if torch.cuda.is_available():
            return
    except ImportError:
        return
    os.environ["ACCELERATE_USE_CPU"] = "true"
    if os.environ.get("RANK", "0") == "0":
        print("hf_am.run: CPU multi-process launch: setting ACCELERATE_USE_CPU=true (as --use_cpu does) so that "
              "the Trainer trains one model over all processes", file=sys.stderr)


def _resolve_deepspeed_config_file() -> None:
    """Let the shipped ``accelerate_configs/*.yaml`` find their DeepSpeed JSON from any directory.

    accelerate passes the yaml's ``deepspeed_config_file`` on unchanged and opens it relative to the
    working directory; a relative path that does not exist there is looked up in this repository
    (where the shipped configs live) before the script starts.
    """
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or os.path.isabs(path) or os.path.exists(path):
        return
    candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    if os.path.exists(candidate):
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = candidate


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage:\n" + USAGE + "\n\nRuns the script with hf_am's Trainer optimizers registered.")
        return 0 if args else 2

    _distribute_cpu_launches()
    _resolve_deepspeed_config_file()
    import hf_am  # noqa: F401  (registers am_adamw / am_sgd when transformers is installed)
    from hf_am.integrations.trainer import register

    if not register():
        print("hf_am.run: transformers is not installed, so --optim am_adamw cannot be registered", file=sys.stderr)
        return 1

    if args[0] == "-m":
        if len(args) < 2:
            print("hf_am.run: -m needs a module name", file=sys.stderr)
            return 2
        module, rest = args[1], args[2:]
        sys.argv = [module, *rest]
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0

    script, rest = args[0], args[1:]
    if not os.path.isfile(script):
        print(f"hf_am.run: no such script: {script!r}", file=sys.stderr)
        return 2
    sys.argv = [script, *rest]
    # What ``python script.py`` puts first on sys.path: the script's directory.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
