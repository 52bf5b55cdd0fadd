"""`python -m ferry.server MODEL [server flags] [engine flags]`: the same as `ferry serve`, without the rest of
the CLI (the e2e tests start servers this way)."""
from __future__ import annotations

import argparse
import sys

from ferry.engine.options import add_engine_arguments, engine_kwargs
from ferry.errors import FerryError
from ferry.server.app import add_server_arguments, run_server, server_kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferry.server", description="OpenAI-compatible HTTP server")
    parser.add_argument("model", help="local Hugging Face folder (config.json + *.safetensors + tokenizer)")
    add_server_arguments(parser)
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_server(args.model, **server_kwargs(args), **engine_kwargs(args))
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
