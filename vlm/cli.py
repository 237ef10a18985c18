"""The `vlm` command. Command groups of other packages (data, eval) plug in through the `vlm.commands`
entry-point group, so `vlm` itself never imports `data_tools` or `evals`."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points


def _list(args: argparse.Namespace) -> int:
    import vlm.connectors  # noqa: F401  (registers the built-ins)
    import vlm.towers  # noqa: F401
    from vlm.connectors.base import CONNECTORS, REDUCERS
    from vlm.towers.base import TOWERS

    for title, registry in (("towers", TOWERS), ("connectors", CONNECTORS), ("token reducers", REDUCERS)):
        print(f"{title}: {', '.join(registry.names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="video language models: build, train, evaluate, chat")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered towers, connectors and token reducers")
    p.set_defaults(func=_list)
    for ep in sorted(entry_points(group="vlm.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
