"""`segactors serve`: run the server."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segactors")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--data-dir", default="./segactors-data")
    serve.add_argument("--no-uvloop", action="store_true",
                       help="serve on asyncio's own loop and h11 (to compare)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        import uvicorn

        from segactors.app import create_app
        from segactors.config import Config

        app = create_app(Config.from_env(args.data_dir))
        loop, http = ("asyncio", "h11") if args.no_uvloop else ("auto", "auto")
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it; exit 0 then.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        print(f"segactors: serving on http://{args.host}:{args.port} "
              f"(data in {args.data_dir})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", loop=loop,
                    http=http, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
