"""The ``affmae`` command: one entry point, one subcommand per job (DESIGN 1).

    affmae pretrain | finetune | predict | evaluate | bench | analyze | demo  [-h] ...

Each job lives in a module exposing ``add_arguments(parser)`` and ``run(args) -> int`` (the
exit code); a module serving two commands names the pair explicitly in ``COMMANDS``
(``evaluate`` is ``add_evaluate_arguments``/``run_evaluate`` of ``affmae.train.predict``). Modules are imported lazily, only for the subcommand being run (so ``affmae
bench`` never imports the training code and a broken or missing module cannot take the other
subcommands down). A subcommand whose module is not installed says so and exits with 2.

User errors (bad config values, unreadable images, missing files) are printed as one line
``affmae <job>: error: ...`` with exit code 2; ``affmae --traceback <job> ...`` shows the full
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

# subcommand -> (module, one-line help[, add-arguments function, run function]); the functions
# default to add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("affmae.train.pretrain",
                 "AFFMAE pretraining on a folder of unlabelled images -> checkpoint"),
    "finetune": ("affmae.train.finetune",
                 "segmentation fine-tuning on image/mask pairs (+ pretrained checkpoint)"),
    "predict": ("affmae.train.predict", "segment images of any size with a fine-tuned checkpoint"),
    "evaluate": ("affmae.train.predict",
                 "score predictions or a checkpoint against labels (mIoU, per-class IoU)",
                 "add_evaluate_arguments", "run_evaluate"),
    "bench": ("affmae.bench.cli", "AFF vs ViT: FLOPs, peak memory, img/s side by side"),
    "analyze": ("affmae.analysis.cli",
                "figures: reconstructions, token maps, PCA, effective rank, mask spectra"),
    "demo": ("affmae.train.demo",
             "end to end on generated EM-like data, on CPU, in a few minutes"),
}

# Exceptions that mean "the user's input is wrong", shown without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, TypeError)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (first token that is a known command), if any."""
    for token in argv:
        if token in COMMANDS:
            return token
        if not token.startswith("-"):
            return None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; only the subcommand named in ``argv`` gets its flags (lazy import)."""
    parser = argparse.ArgumentParser(
        prog="affmae", description="AFFMAE: masked-autoencoder pretraining of an off-grid "
        "AutoFocusFormer, fine-tuning, prediction and benchmarks. "
        "`affmae <command> -h` lists a command's flags.")
    from affmae import __version__

    parser.add_argument("--version", action="version", version=f"affmae {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show full tracebacks for errors (default: one-line messages)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    chosen = _chosen(argv)
    for name, (module, help_text, *funcs) in COMMANDS.items():
        missing = not _available(module)
        p = sub.add_parser(name, help=help_text + (" [not available]" if missing else ""),
                           description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_name, run_name = funcs or ("add_arguments", "run")
        p.set_defaults(_module=module, _run=run_name)
        if name == chosen and not missing:
            getattr(importlib.import_module(module), add_name)(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``affmae`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    if chosen is not None and not _available(COMMANDS[chosen][0]):
        print(f"affmae {chosen}: not available: {COMMANDS[chosen][0]} missing", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(getattr(importlib.import_module(args._module), args._run)(args) or 0)
    except USER_ERRORS as e:
        if args.traceback:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"affmae {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"affmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
