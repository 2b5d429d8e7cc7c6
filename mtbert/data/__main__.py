"""Get the CS224N data files.

    python -m mtbert.data download --to DIR [--base-url URL]   # the CS224N starter files
    python -m mtbert.data download --source hub --to DIR       # built from the Hugging Face hub

The first fetches the starter repository's files (or a mirror's: `--base-url`, `file://`
included); the second builds the same layout from GLUE QQP (all ~364k training pairs),
GLUE STS-B and SST-5 (`pip install -e '.[hub]'`). Files already present and valid are kept;
each file is checked by the reader training uses, and a table sums up rows per file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtbert.data.download import STARTER, build_from_hub, download, summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mtbert.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="fetch or build the CS224N files into a folder")
    get.add_argument("--to", type=Path, required=True, help="the data folder (then data.root=DIR)")
    get.add_argument("--source", choices=["starter", "hub"], default="starter")
    get.add_argument("--base-url", default=STARTER, help=f"where the starter files are (default {STARTER})")
    args = parser.parse_args(argv)
    to = args.to.expanduser().resolve()
    outcomes = build_from_hub(to) if args.source == "hub" else download(to, args.base_url)
    print(summary(outcomes, to))
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
