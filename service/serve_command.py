"""`moe-embed serve`: run the gRPC and HTTP service (flags and env vars, see
service/config.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from . import config as serve_config
from .logging import configure_logging, json_stderr

SWITCH_INTERVAL_S = 0.0005

DESCRIPTION = """\
Run the moe-embed service: gRPC (moe_embed.v1.Embedder, grpc.health.v1.Health, reflection)
and the OpenAI-compatible HTTP API (POST /v1/embeddings, GET /v1/models, /health, /ready,
/docs) on one engine, with Prometheus metrics on a separate HTTP port. TLS, mTLS and API keys
come from files, re-read when they change or on SIGHUP. Every flag has an environment
variable; a flag wins over its variable, a variable over the default. Without --bundle the
embedded demo model is built on first run (a tiny synthetic checkpoint with the real
tokenizer: its vectors are NOT meaningful). SIGTERM drains both protocols: health goes
NOT_SERVING (HTTP /ready 503), new work is refused, admitted work finishes within
--drain-grace-s, then the process exits 0."""


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = serve_config.resolve(args)
    except ValueError as exc:
        args.parser.error(str(exc))
    configure_logging(cfg.log_level)
    json_stderr()  # gRPC core's own lines become JSON too
    log = structlog.get_logger("moe_embed.serve")
    bundle = cfg.bundle
    if not bundle:
        from .demo import ensure_demo_bundle

        log.info("demo_model", cache_dir=str(cfg.cache_path),
                 note="no --bundle: serving the embedded tiny demo model; its vectors are "
                      "not meaningful")
        bundle = str(ensure_demo_bundle(cfg.cache_path))
    from .server import serve

    # the tokenizing thread holds the GIL while it segments a large request: the event loop
    # gets it back within this interval instead of CPython's 5 ms, at each of the several
    # wake-ups a call needs
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return asyncio.run(serve(cfg, bundle))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the embedding service (gRPC and HTTP)",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_config.add_arguments(p)
    p.set_defaults(func=_serve, parser=p)
