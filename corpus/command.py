"""`moe-embed batch INPUT --out OUTPUT`: a file of documents in, Parquet shards of vectors out.

Exit status: 0 done (or already complete), 1 the backend failed (what is committed stays
resumable), 2 bad options or input, 130 interrupted (Ctrl-C or SIGTERM; resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from moe_embed.service.tasks import TASK_NAMES

SWITCH_INTERVAL_S = 0.0005  # as `serve`: the helper thread gives the event loop the GIL back

DESCRIPTION = """\
Embed a corpus: INPUT is .jsonl, .csv or .parquet (by extension), read as a stream; OUTPUT is a
directory of Parquet shards (part-NNNNNN.parquet, zstd) and _manifest.json, one output row per
input row (or per chunk with --chunk-tokens), in input order, with the columns id, [chunk,
char_start, char_end,] vector (fixed-size list of float32; null for a failed row), tokens,
truncated, error (null when the row succeeded: a bad row never fails the job). Runs in process
on this machine's cores (--bundle, default the embedded demo model) or against running servers
(--server). --resume continues a killed job; the output is then identical, bit for bit, to an
uninterrupted run's."""


def _security(args: argparse.Namespace):
    from .remote_backend import Security

    return Security(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.api_key_file)


def _backend(args: argparse.Namespace, bundle: str):
    if args.server:
        from .remote_backend import RemoteBackend

        targets = [t.strip() for t in args.server.split(",") if t.strip()]
        return RemoteBackend(targets, args.task, args.dimensions, args.normalize,
                             _security(args))
    from .engine_backend import EngineBackend

    return EngineBackend(bundle, args.task, args.dimensions, args.normalize, args.workers,
                         args.threads, args.log_level)


async def _run(job) -> object:
    """The job, cancelled cleanly by SIGTERM or Ctrl-C (SIGINT). Both are handled here, not left
    to asyncio.run: a process started in the background by a shell without job control inherits
    SIGINT ignored, and Python then installs no handler of its own for it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await job.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_embed.service.errors import InvalidInput
    from moe_embed.service.logging import configure_logging
    from moe_embed.workers.bundle.format import BundleError

    from .job import Job, JobOptions
    from .readers import InputError
    from .retry import BackendError
    from .shards import OutputError

    configure_logging(args.log_level)
    remote_only = [f"--{n.replace('_', '-')}" for n in ("tls_ca_file", "tls_cert_file",
                                                         "tls_key_file", "api_key_file")
                   if getattr(args, n)]
    if remote_only and not args.server:
        print(f"moe-embed batch: error: {', '.join(remote_only)} need(s) --server",
              file=sys.stderr)
        return 2
    progress = "quiet" if args.quiet else args.progress
    opts = JobOptions(Path(args.input), Path(args.out), args.task, args.dimensions,
                      args.normalize, args.text_field, args.id_field, args.chunk_tokens,
                      args.chunk_overlap, args.shard_rows, args.resume, progress)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        bundle = args.bundle
        if not bundle:
            from moe_embed.service.demo import ensure_demo_bundle

            bundle = str(ensure_demo_bundle())
        job = Job(opts, _backend(args, bundle), bundle)
        writer = asyncio.run(_run(job))
    except (InputError, OutputError, InvalidInput, BundleError, ValueError, OSError) as exc:
        print(f"moe-embed batch: error: {exc}", file=sys.stderr)
        return 2
    except BackendError as exc:
        print(f"moe-embed batch: {exc}; what is committed can be resumed with --resume",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"moe-embed batch: interrupted; run again with --resume to continue "
              f"{args.out}", file=sys.stderr)
        return 130
    done = writer.committed
    if not args.quiet:
        print(f"moe-embed batch: {args.out}: {done.input_rows} rows, {done.output_rows} output "
              f"rows in {done.shards} shards", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="embed a corpus file into Parquet (resumable)",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="a .jsonl, .csv or .parquet file")
    p.add_argument("--out", required=True, metavar="OUTPUT",
                   help="output directory (Parquet shards and _manifest.json)")
    p.add_argument("--text-field", default="text", help="the field holding the text "
                   "(default: text)")
    p.add_argument("--id-field", default="id", help="the field holding the row's id (default: "
                   "id); a row without one gets its row number (0-based)")
    p.add_argument("--task", required=True, choices=TASK_NAMES,
                   help="task prefix the model was trained with; 'none' = text used as given")
    p.add_argument("--dimensions", type=int, default=0,
                   help="Matryoshka output size (0 = full; the real model supports 256..768)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalize the vectors (default: on)")
    p.add_argument("--chunk-tokens", type=int, default=0, metavar="N",
                   help="split each text into windows of N tokens (1..512), one output row "
                   "each; default 0: no chunking, long texts are truncated and flagged")
    p.add_argument("--chunk-overlap", type=int, default=0, metavar="M",
                   help="tokens shared by consecutive windows (0..N-1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the job whose output is OUTPUT (refused if anything that "
                   "produced it differs)")
    p.add_argument("--shard-rows", type=int, default=5000,
                   help="input rows per output shard: the unit of commit and of resume")
    p.add_argument("--bundle", help="bundle directory (default: the embedded demo model); "
                   "with --server only its tokenizer is used (for chunking and truncation)")
    p.add_argument("--workers", type=int, default=None,
                   help="in-process worker processes (default: as serve, one per 4 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads per in-process worker (default: cores/workers)")
    p.add_argument("--server", metavar="HOST:PORT[,HOST:PORT...]",
                   help="embed through these running servers (gRPC EmbedStream) instead")
    p.add_argument("--tls-ca-file", help="with --server: CA certificate(s) to verify the "
                   "servers (turns TLS on)")
    p.add_argument("--tls-cert-file", help="with --server: client certificate for mTLS "
                   "(with --tls-key-file)")
    p.add_argument("--tls-key-file", help="with --server: the client certificate's key")
    p.add_argument("--api-key-file", help="with --server: file whose first non-comment line "
                   "is the API key")
    p.add_argument("--progress", choices=("auto", "bar", "json"), default="auto",
                   help="auto: a bar on a terminal, JSON lines on stderr otherwise")
    p.add_argument("--quiet", action="store_true", help="no progress, no summary")
    p.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_batch)
