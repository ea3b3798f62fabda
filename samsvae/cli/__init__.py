"""The ``samsvae`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used so
``samsvae --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

SUBCOMMANDS = {
    # name: (module, one-line help)
    "simulate": ("samsvae.cli.simulate", "write a simulated perturbation screen (.h5ad)"),
    "train": ("samsvae.cli.train", "train a model on a screen (or --demo)"),
    "evaluate": ("samsvae.cli.evaluate", "evaluate a trained run: IWELBO, ATE, masks"),
    "predict": ("samsvae.cli.predict", "simulate integer counts of conditions from a trained "
                "run (.h5ad)"),
    "bench": ("samsvae.cli.bench", "time the training step and IWELBO per backend"),
    "info": ("samsvae.cli.info", "print versions and the backend each op uses"),
}


def build_parser(names=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samsvae", description="SAMS-VAE for perturbation screens: simulate, train, "
        "evaluate, benchmark. `samsvae COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if names is None or name in names:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [a for a in argv[:1] if a in SUBCOMMANDS]
    parser = build_parser(names=wanted or [])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from ..data.options import (
        option_style,  # messages name --flags, not keyword arguments
    )
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        with option_style("cli"):
            return int(module.run(args) or 0)
    finally:
        warnings.formatwarning = formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # a user of the command sees the message, not the source line that raised it
    return f"samsvae: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
