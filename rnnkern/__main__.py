"""Command line of rnnkern: `python -m rnnkern gradflow ...` (also the `rnnkern` console script)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from . import gradflow

    parser = argparse.ArgumentParser(prog="rnnkern", description="rnnkern tools")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    flow = commands.add_parser(
        "gradflow", help="train RNN/GRU/LSTM on long-range tasks and plot ‖∂L/∂h_t‖ per timestep",
        description=gradflow.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gradflow.add_arguments(flow)
    flow.set_defaults(func=gradflow.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
