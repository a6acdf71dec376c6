"""Site-side subcommands: ``fedlora site check`` and ``fedlora data split``."""

from __future__ import annotations

import argparse


def site_group(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="site admin tools")
    site.add_subparsers(dest="site_command", required=True, metavar="SITE_COMMAND")


def data_group(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data preparation tools")
    data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
