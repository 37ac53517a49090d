"""Command line: `tpsexplore {methods,profile,search,report,export}`.

Each subcommand lives in its subpackage as ``add_arguments(parser)`` + ``run(args) -> int``; this
module only wires them and turns bad input into a one-line error with exit code 2.

Exit codes: 0 success; 1 the search ran but no trial completed; 2 bad input, refused before anything was
written (argparse errors included, as one line); 130 Ctrl-C (what was measured is kept).

Building the parser imports no torch, timm, optuna, pandas or SQLAlchemy (``--help`` stays well under a
second): the subcommand modules import their heavy parts inside ``run``, and choices that live in heavy
modules are checked after parsing.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from .errors import one_line

# name -> (module with add_arguments/run, one-line help)
COMMANDS = {
    "methods": ("tpsexplore.cli", "list the registered token-reduction methods"),
    "profile": ("tpsexplore.measure.profile_cli", "measure GMACs, throughput and accuracy of one config"),
    "search": ("tpsexplore.search.cli", "Optuna search of method x locations x keep ratios under a budget"),
    "report": ("tpsexplore.report.cli", "Pareto-front report (HTML, Markdown, CSV, figures) of a study"),
    "export": ("tpsexplore.report.export_cli", "export a trial as a deployment config"),
}

EXIT_OK, EXIT_NO_TRIAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`tpsexplore methods` takes no options."""


def run(args: argparse.Namespace) -> int:
    """`tpsexplore methods`: one row per registered method, under a header."""
    from .reduce.methods import METHODS

    head = ("method", "policy", "treatment", "treatments allowed", "reduces", "keep rule", "trained", "description")
    where = {"inter": "before block i", "intra": "in block i"}
    rows = [head] + [(s.name, s.policy, s.treatment, "/".join(s.treatments),
                      "every block" if s.merges else where.get(s.placement, s.placement),
                      s.count_rule, "yes" if s.trainable else "no", s.description) for s in METHODS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return EXIT_OK


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = OneLineParser(
        prog="tpsexplore",
        description="Profiling and design-space exploration of token reduction (TPS and baselines) "
                    "in timm vision transformers.",
        epilog="exit codes: 0 success; 1 the search ran but no trial completed; 2 bad input, refused before "
               "anything was written; 130 interrupted (Ctrl-C)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, modules = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser, which knows its flags
            sub = _subparser(parser, args.command) if args.command else None
            (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help and --version exit 0 as argparse does; usage errors return 2
        if exc.code in (0, None):
            raise
        return int(exc.code) if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if not args.command:
        parser.print_help()
        return EXIT_OK
    try:
        return int(modules[args.command].run(args) or 0)
    except _user_errors() as exc:
        text = flag_names(one_line(exc), _subparser(parser, args.command), argv,
                          getattr(modules[args.command], "FIELD_FLAGS", {}))
        print(f"tpsexplore {args.command}: error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"tpsexplore {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are bad input (exit 2). `WeightsUnavailableError` lives beside timm, so it is only
    looked up when tpsexplore.backbones was loaded (it cannot have been raised otherwise)."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, PermissionError]
    backbones = sys.modules.get("tpsexplore.backbones")
    if backbones is not None:
        errors.append(backbones.WeightsUnavailableError)
    return tuple(errors)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


_FIELD = re.compile(r"^([A-Za-z_][\w.]*): ")
_KEYWORD = re.compile(r"\b([A-Za-z_]\w*)=('[^']*'|\"[^\"]*\"|[^\s,;)]+)")


def flag_names(text: str, parser: argparse.ArgumentParser | None, argv: list[str],
               field_flags: dict[str, str] | None = None) -> str:
    """Name command-line flags in an error from the settings layers, which name Python fields.

    ``budget: 1.5 is outside (0, 1]`` becomes ``--budget: 1.5 ...`` when the value came from ``--budget`` on the
    command line (a value from a study file keeps the file's key), and Python keywords in the text
    (``checkpoint=PATH``, ``weights='random'``) become the flags that set them (``--checkpoint PATH``,
    ``--weights random``). ``field_flags`` maps fields set by a flag of another name (``keep_ratios`` -> ``keep``).
    """
    if parser is None:
        return text
    field_flags = field_flags or {}
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions
             if a.option_strings and a.dest != "help"}

    def flag_for(field: str) -> str | None:
        return flags.get(field_flags.get(field, field))

    def given(flag: str) -> bool:
        for token in argv:
            name = token.split("=", 1)[0]
            if name.startswith("--") and len(name) > 2 and flag.startswith(name):  # argparse allows prefixes
                return True
        return False

    m = _FIELD.match(text)
    if m:
        flag = flag_for(m.group(1))
        if flag is not None and given(flag):
            text = f"{flag}: {text[m.end():]}"

    def keyword(k: re.Match) -> str:
        flag = flag_for(k.group(1))
        if flag is None:
            return k.group(0)
        return f"{flag} {k.group(2).strip(chr(39) + chr(34))}"

    return _KEYWORD.sub(keyword, text)


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
