"""python -m server: serve the manifest with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from server.app import create_app
from server.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    logging.getLogger("server").info("serving %s", settings.manifests().current())
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
