"""python -m training <command>: every artifact the server loads is built here."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="command", required=True)
    zoo = sub.add_parser("zoo", help="build the embedded default models")
    zoo.add_argument("what", choices=["placeholder"], help="placeholder: untrained stand-ins, built in seconds")
    zoo.add_argument("--manifest", type=Path, default=Settings().manifest)
    zoo.add_argument("--if-missing", action="store_true", help="do nothing when the zoo is already built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "zoo" and args.what == "placeholder":
        from training.zoo.build import build_placeholder_zoo

        if build_placeholder_zoo(args.manifest, if_missing=args.if_missing):
            print("=" * 78)
            print("Built UNTRAINED PLACEHOLDER models into the manifest", args.manifest)
            print("They let the service start; their images and text are noise until the trained")
            print("zoo replaces them.")
            print("=" * 78)
        else:
            print(f"zoo already built ({args.manifest}); nothing to do")


if __name__ == "__main__":
    main()
