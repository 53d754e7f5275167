"""`moe-embed embed`: embed texts in-process (no server) or through a running server."""

from __future__ import annotations

import argparse
import json
import sys

from .client import RemoteError
from .errors import InvalidInput
from .tasks import TASK_NAMES


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.input_json:
        raw = sys.stdin.read() if args.input_json == "-" else open(args.input_json).read()
        data = json.loads(raw)
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise InvalidInput("input-json", "must be a JSON list of strings")
        texts += data
    return texts


def _embed(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    try:
        if args.server:
            from .client import embed_remote

            result = embed_remote(args.server, texts, args.task, args.dimensions)
        else:
            from .demo import ensure_demo_bundle
            from .local import LocalEmbedder

            embedder = LocalEmbedder(args.bundle or ensure_demo_bundle(), args.threads)
            result = embedder.embed(texts, args.task, args.dimensions).to_json()
    except InvalidInput as exc:
        print(f"moe-embed embed: {exc}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(f"moe-embed embed: server {args.server}: {exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="embed texts and print JSON",
        description="Embed texts in-process from a bundle (default: the embedded demo model) or, "
        "with --server, through a running moe-embed service. Prints "
        '{"embeddings": [[...]], "tokens": [n, ...], "truncated": [bool, ...], "dimensions": d}.')
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--input-json", metavar="FILE",
                   help="JSON list of texts to embed ('-' = stdin), after any positional texts")
    p.add_argument("--task", required=True, choices=TASK_NAMES,
                   help="task prefix the model was trained with; 'none' = text used as given")
    p.add_argument("--dimensions", type=int, default=0,
                   help="Matryoshka output size (0 = full; the real model supports 256..768)")
    p.add_argument("--bundle", help="bundle directory (default: the embedded demo model)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads for in-process mode (default: all cores)")
    p.add_argument("--server", metavar="HOST:PORT", help="call a running server instead")
    p.set_defaults(func=_embed)
