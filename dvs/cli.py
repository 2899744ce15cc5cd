"""The ``dvs`` command line.

Each capability contributes its sub-commands from its own ``cli`` module (a function
``register(cli: Cli) -> None``), so capabilities do not edit each other's files; this module
only knows their names. ``dvs probe`` lives here because every capability depends on it.
Errors that dvs raises on purpose (``DvsError``) print one clear line and exit with 1;
anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from dvs.errors import DvsError

# capability modules that add sub-commands; missing ones are skipped
CAPABILITY_CLIS = (
    "dvs.container.cli",
    "dvs.fs.cli",
    "dvs.vm.cli",
    "dvs.hypervisor.cli",
    "dvs.virtio.cli",
    "dvs.shield.cli",
)

Handler = Callable[[argparse.Namespace], int]


class Cli:
    """The parser tree; capabilities add commands to top-level groups (``vm``, ``fs``...)."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(
            prog="dvs", description="Debug, extend and protect slim containers and VMs."
        )
        self.parser.add_argument("--version", action="version", version=_version())
        self._top = self.parser.add_subparsers(dest="command", metavar="COMMAND")
        self._groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}

    def command(
        self, name: str, help: str, handler: Handler, group: str | None = None
    ) -> argparse.ArgumentParser:
        """Add ``dvs [group] name``; ``handler(args)`` returns the exit status."""
        parent = self._top if group is None else self.group(group)
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def group(
        self, name: str, help: str = ""
    ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        if name not in self._groups:
            parser = self._top.add_parser(name, help=help or f"{name} commands")
            self._groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
            parser.set_defaults(handler=lambda _args, p=parser: _usage(p))
        return self._groups[name]


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _version() -> str:
    from dvs import __version__

    return f"dvs {__version__}"


def _probe(args: argparse.Namespace) -> int:
    from dvs import probe

    report = probe.probe()
    print(report.to_json() if args.json else probe.format_table(report))
    return 0


def build() -> Cli:
    cli = Cli()
    probe_cmd = cli.command(
        "probe", "show what this kernel offers and which backends dvs uses", _probe
    )
    probe_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    for module_name in CAPABILITY_CLIS:
        package = module_name.rpartition(".")[0]
        if (
            importlib.util.find_spec(package) is None
            or importlib.util.find_spec(module_name) is None
        ):
            continue
        importlib.import_module(module_name).register(cli)
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    cli = build()
    args = cli.parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        cli.parser.print_help()
        return 2
    try:
        return handler(args)
    except DvsError as exc:
        print(f"dvs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
