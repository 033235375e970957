"""``generalist data fetch NAME DIR``: the command line of :mod:`generalist.data.fetch`."""

from __future__ import annotations

import argparse
from typing import Any

from generalist.data.fetch import SOURCES


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from generalist.data.fetch import fetch

    fetch(args.dataset, args.directory, mirror=args.mirror)
    return 0


def add_data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="get datasets: generalist data fetch NAME DIR")
    actions = data.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser(
        "fetch",
        help="download, verify (published MD5) and unpack a dataset into DIR; resumable",
    )
    fetch.add_argument("dataset", choices=[*SOURCES, "imagenet"])
    fetch.add_argument("directory", metavar="DIR", help="folder to put it in (created)")
    fetch.add_argument(
        "--mirror", metavar="BASE_URL", help="download the same file names from BASE_URL instead"
    )
    fetch.set_defaults(func=cmd_data_fetch)
