"""python -m server: serve the manifest with uvicorn; with --build-zoo, build the missing embedded
zoo in a background process meanwhile (each artifact is hot-loaded as it lands)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import signal
import subprocess
import sys

import uvicorn

from server.access import configure_logging
from server.app import create_app
from server.serve import uvicorn_config
from server.settings import Settings

log = logging.getLogger("server")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--env-file", default=None, help="read LOOPSTACK_ settings from this file too")
    parser.add_argument("--build-zoo", action="store_true",
                        help="build the missing embedded zoo in the background (python -m training zoo all)")
    return parser


def stop_with_parent() -> None:
    """In the build's process, before it runs: SIGTERM it when the server's process ends, however it
    ends (uvicorn re-raises the SIGTERM it drained on, which ends the server before any `finally`).
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere the `finally` below is what stops the build."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> None:
    args = parser().parse_args()
    settings = Settings(_env_file=args.env_file)
    configure_logging(settings.log_format)
    log.info("serving %s", settings.manifests().current())
    build = None
    if args.build_zoo:
        # a process of its own: training never runs inside the server (which never imports it)
        build = subprocess.Popen([sys.executable, "-m", "training", "zoo", "all"], preexec_fn=stop_with_parent)
        log.info("building the missing embedded zoo in the background (pid %d); progress in /v1/models", build.pid)
    try:
        uvicorn.Server(uvicorn_config(create_app(settings), settings, args.host, args.port, log_level="info")).run()
    finally:
        if build is not None and build.poll() is None:
            build.terminate()  # the build records where it stopped; the next run resumes
            try:
                build.wait(timeout=15)
            except subprocess.TimeoutExpired:
                build.kill()


if __name__ == "__main__":
    main()
