"""Command line: `tpsexplore {methods,profile,search,report,export}`.

Each subcommand lives in its subpackage as ``add_arguments(parser)`` + ``run(args) -> int``; this
module only wires them and turns bad input into a one-line error with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .backbones import WeightsUnavailableError

# name -> (module with add_arguments/run, one-line help)
COMMANDS = {
    "methods": ("tpsexplore.cli", "list the registered token-reduction methods"),
    "profile": ("tpsexplore.measure.profile_cli", "measure GMACs, throughput and accuracy of one config"),
    "search": ("tpsexplore.search.cli", "Optuna search of method x locations x keep ratios under a budget"),
    "report": ("tpsexplore.report.cli", "Pareto-front report (HTML, Markdown, CSV, figures) of a study"),
    "export": ("tpsexplore.report.export_cli", "export a trial as a deployment config"),
}

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, WeightsUnavailableError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`tpsexplore methods` takes no options."""


def run(args: argparse.Namespace) -> int:
    from .reduce.methods import METHODS

    width = max(len(n) for n in METHODS)
    for spec in METHODS.values():
        print(f"{spec.name:<{width}}  policy={spec.policy:<10} treatment={spec.treatment:<8} "
              f"({'/'.join(spec.treatments)})  {spec.placement}-block  {spec.description}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="tpsexplore",
        description="Profiling and design-space exploration of token reduction (TPS and baselines) "
                    "in timm vision transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("tpsexplore"):
                raise
            continue  # a command whose module does not exist yet is not listed
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return int(modules[args.command].run(args) or 0)
    except USER_ERRORS as exc:
        print(f"tpsexplore {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tpsexplore {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return " ".join(text.split())


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
