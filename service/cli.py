"""`moe-embed`: one command, a subcommand per job (export, synthetic, embed, serve)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..workers.bundle.config import CheckpointError, ConfigError
from ..workers.bundle.format import BundleError

# each module registers its own subcommand with add_parser(subparsers)
_COMMANDS = (
    "moe_embed.export.commands",
    "moe_embed.service.embed_command",
    "moe_embed.service.serve_command",
    "moe_embed.batch.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-embed",
        description="Serve nomic-embed-text-v2-moe with routed Mixture-of-Experts execution.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, BundleError) as exc:
        print(f"moe-embed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
