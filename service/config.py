"""`serve` configuration: every setting has a flag and an env var; flag > env > default.

One table (SETTINGS) drives the argparse flags, their --help text and the resolution, so the
flags, the environment variables the Helm chart sets and the documentation cannot disagree.
Defaults that depend on the machine are computed from the cores this process may use
(CPU affinity and the cgroup CPU quota, so a Kubernetes CPU limit counts).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..workers.process import policy

LOG_LEVELS = ("debug", "info", "warning", "error")
# The workers' nice steps below the frontend (workers/process/priority.py): 10, a weight of
# ~1/9 of the frontend's, so a waking frontend thread takes a core from batch compute at once.
# At 5 (~1/3) a one-text call beside 20 heavy HTTP clients had p99 18-21 ms, at 10 13-15 ms
# (benchmarks/README.md); closed-loop throughput was the same at both.
WORKER_NICE = 10


def available_cores() -> int:
    """Cores this process may run on: affinity, capped by a cgroup v2 CPU quota if any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def default_workers(cores: int) -> int:
    """One worker per 4 cores (1 on small machines): each worker holds a copy of the weights,
    and a short text is memory-bound, so a few threads per worker beat many 1-thread workers."""
    return max(1, cores // 4)


def default_threads(cores: int, workers: int) -> int:
    return max(1, cores // max(1, workers))


@dataclass(frozen=True)
class ServeConfig:
    bundle: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = ""
    metrics_port: int = 9090
    workers: int = 1
    threads_per_worker: int = 1
    share_weights: bool = True
    # 5: a light call's p99 in the 120 s soak 56.7 ms against 105.9 at 0 (benchmarks/README.md)
    worker_nice: int = WORKER_NICE
    max_batch_tokens: int = policy.MAX_BATCH_TOKENS
    max_wait_ms: float = policy.MAX_WAIT_MS
    max_queue: int = 4096
    max_inputs: int = 256
    max_message_bytes: int = 4 * 1024 * 1024
    drain_grace_s: float = 20.0
    batch_timeout_s: float = 10.0
    # 128 (nginx's default; gRPC-Go's is 100): a burst of 1,500 calls on one connection took
    # the frontend +18-20 MB with 1024 streams open at once, +5 MB with 128 (the rest wait in
    # the client's transport, none refused: benchmarks/README.md, "burst memory")
    max_concurrent_streams: int = 128
    keepalive_s: float = 60.0
    max_connection_age_s: float = 0.0
    cache_dir: str = "~/.cache/moe-embed"
    log_level: str = "info"
    http_port: int = 8080
    http_header_timeout_s: float = 60.0
    http_body_timeout_s: float = 60.0
    http_keepalive_s: float = 75.0
    http_max_connections: int = 1024
    health_port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    api_key_file: str = ""
    reflection: bool = True
    served_model_name: tuple[str, ...] = ()  # empty: the bundle's model id
    otlp_endpoint: str = ""  # empty: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else tracing off

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "metrics_port": 0 <= self.metrics_port <= 65535,
            "workers": self.workers >= 1,
            "threads_per_worker": self.threads_per_worker >= 1,
            "worker_nice": 0 <= self.worker_nice <= 19,
            "max_batch_tokens": self.max_batch_tokens >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "max_queue": self.max_queue >= 1,
            "max_inputs": self.max_inputs >= 1,
            "max_message_bytes": self.max_message_bytes >= 1024,
            "drain_grace_s": self.drain_grace_s >= 0,
            "batch_timeout_s": self.batch_timeout_s > 0,
            "max_concurrent_streams": self.max_concurrent_streams >= 1,
            "keepalive_s": self.keepalive_s >= 1,
            "max_connection_age_s": self.max_connection_age_s >= 0,
            "log_level": self.log_level in LOG_LEVELS,
            "http_port": 0 <= self.http_port <= 65535,
            "http_header_timeout_s": self.http_header_timeout_s > 0,
            "http_body_timeout_s": self.http_body_timeout_s > 0,
            "http_keepalive_s": self.http_keepalive_s > 0,
            "http_max_connections": self.http_max_connections >= 1,
            "health_port": 0 <= self.health_port <= 65535,
        }
        checks["served_model_name"] = all(n and n == n.strip() and "," not in n
                                          for n in self.served_model_name)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "invalid setting(s): "
                + ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: give both for TLS, "
                             "or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        ports = [(name, getattr(self, name)) for name in
                 ("port", "http_port", "health_port", "metrics_port") if getattr(self, name)]
        for i, (name, port) in enumerate(ports):
            for other, other_port in ports[i + 1:]:
                if port == other_port:
                    raise ValueError(f"{name} and {other} are both {port}; they must differ")

    @property
    def tls(self) -> bool:
        """TLS on the gRPC and HTTP ports (mTLS too when a client CA is given)."""
        return bool(self.tls_cert_file)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


def parse_bool(raw: str | bool) -> bool:
    """A boolean from a flag (already a bool) or an env var (true/false, 1/0, yes/no, on/off)."""
    if isinstance(raw, bool):
        return raw
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


parse_bool.__name__ = "bool"  # as named in "cannot parse ... as bool"


def parse_names(raw: str) -> tuple[str, ...]:
    """Comma-separated names (blanks around them dropped); at least one."""
    names = tuple(n.strip() for n in raw.split(","))
    if not names or not all(names):
        raise ValueError(raw)
    return names


parse_names.__name__ = "comma-separated names"


@dataclass(frozen=True)
class Setting:
    name: str  # ServeConfig field
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None

    @property
    def boolean(self) -> bool:
        """A --flag / --no-flag pair rather than a flag with a value."""
        return self.parse is parse_bool


SETTINGS: tuple[Setting, ...] = (
    Setting("bundle", "--bundle", "MOE_EMBED_BUNDLE", str,
            "exported bundle directory (empty: the embedded demo model, built on first run; "
            "its vectors are not meaningful)", "DIR"),
    Setting("host", "--host", "MOE_EMBED_HOST", str,
            "address to listen on (0.0.0.0: every interface, as in a container)", "HOST"),
    Setting("port", "--port", "MOE_EMBED_PORT", int, "gRPC port (0: pick a free one)", "PORT"),
    Setting("metrics_host", "--metrics-host", "MOE_EMBED_METRICS_HOST", str,
            "address of the metrics endpoint (empty: the same as --host)", "HOST"),
    Setting("metrics_port", "--metrics-port", "MOE_EMBED_METRICS_PORT", int,
            "Prometheus /metrics HTTP port (0 disables)", "PORT"),
    Setting("workers", "--workers", "MOE_EMBED_WORKERS", int,
            "worker processes (see --share-weights for their memory)", "N"),
    Setting("threads_per_worker", "--threads-per-worker", "MOE_EMBED_THREADS_PER_WORKER", int,
            "ONNX Runtime / torch threads in each worker", "N"),
    Setting("share_weights", "--share-weights", "MOE_EMBED_SHARE_WEIGHTS", parse_bool,
            "workers with one thread each are forked from one loader process and share its "
            "weights (and restart in milliseconds); workers with more threads, or with "
            "--no-share-weights, each load their own copy"),
    Setting("worker_nice", "--worker-nice", "MOE_EMBED_WORKER_NICE", int,
            "nice steps the workers run below the frontend (0..19): under full load the "
            "frontend's threads get a core without waiting behind batch compute; the workers "
            "still get every core it leaves idle", "N"),
    Setting("max_batch_tokens", "--max-batch-tokens", "MOE_EMBED_MAX_BATCH_TOKENS", int,
            "real tokens in one batch (what its linear layers compute: padding never reaches "
            "them); attention's padded width is bounded separately, per 512-token chunk in "
            "the worker", "N"),
    Setting("max_wait_ms", "--max-wait-ms", "MOE_EMBED_MAX_WAIT_MS", float,
            "longest a batch waits for companions before it is queued behind a busy worker "
            "(an idle worker gets work at once, unless the callers of the batch of small "
            "requests it has just finished are not back yet: at most 20 ms, and no longer "
            "than that batch took per request)", "MS"),
    Setting("max_queue", "--max-queue", "MOE_EMBED_MAX_QUEUE", int,
            "inputs allowed to wait for a worker; past it requests get RESOURCE_EXHAUSTED", "N"),
    Setting("max_inputs", "--max-inputs", "MOE_EMBED_MAX_INPUTS", int,
            "inputs allowed in one request", "N"),
    Setting("max_message_bytes", "--max-message-bytes", "MOE_EMBED_MAX_MESSAGE_BYTES", int,
            "largest gRPC message received or sent", "BYTES"),
    Setting("drain_grace_s", "--drain-grace-s", "MOE_EMBED_DRAIN_GRACE_S", float,
            "on SIGTERM, seconds allowed for in-flight work to finish", "SECONDS"),
    Setting("batch_timeout_s", "--batch-timeout-s", "MOE_EMBED_BATCH_TIMEOUT_S", float,
            "a batch still running this long plus 20x its expected time (from recent batches' "
            "time per token) is taken for stuck: its worker is killed and restarted, the "
            "batch sent once more", "SECONDS"),
    Setting("max_concurrent_streams", "--max-concurrent-streams",
            "MOE_EMBED_MAX_CONCURRENT_STREAMS", int,
            "concurrent calls (HTTP/2 streams) one client connection may have open; gRPC "
            "clients hold calls past it until one ends", "N"),
    Setting("keepalive_s", "--keepalive-s", "MOE_EMBED_KEEPALIVE_S", float,
            "ping an idle connection after this long; one that does not answer within 20 s "
            "is closed (clients may ping every 10 s at most)", "SECONDS"),
    Setting("max_connection_age_s", "--max-connection-age-s", "MOE_EMBED_MAX_CONNECTION_AGE_S",
            float, "close connections older than this (with --drain-grace-s for their calls to "
            "finish), so clients reconnect and spread over new replicas; 0 = never", "SECONDS"),
    Setting("cache_dir", "--cache-dir", "MOE_EMBED_CACHE_DIR", str,
            "where the demo model is built and cached", "DIR"),
    Setting("log_level", "--log-level", "MOE_EMBED_LOG_LEVEL", str,
            "log level: " + ", ".join(LOG_LEVELS), "LEVEL"),
    Setting("http_port", "--http-port", "MOE_EMBED_HTTP_PORT", int,
            "OpenAI-compatible HTTP API port (POST /v1/embeddings, GET /v1/models, /health, "
            "/ready, /docs); 0 disables HTTP", "PORT"),
    Setting("http_header_timeout_s", "--http-header-timeout-s", "MOE_EMBED_HTTP_HEADER_TIMEOUT_S",
            float, "an HTTP connection (metrics too) must send its request's headers within "
            "this long of opening, or of its previous response; else it is closed (nginx's "
            "client_header_timeout)", "SECONDS"),
    Setting("http_body_timeout_s", "--http-body-timeout-s", "MOE_EMBED_HTTP_BODY_TIMEOUT_S",
            float, "an HTTP request's whole body must arrive within this long of its headers; "
            "else 408 and the connection is closed", "SECONDS"),
    Setting("http_keepalive_s", "--http-keepalive-s", "MOE_EMBED_HTTP_KEEPALIVE_S", float,
            "an idle HTTP keep-alive connection is closed after this long (nginx's "
            "keepalive_timeout; longer than a load balancer's 60 s idle timeout)", "SECONDS"),
    Setting("http_max_connections", "--http-max-connections", "MOE_EMBED_HTTP_MAX_CONNECTIONS",
            int, "open connections the HTTP port holds (at most half the descriptor limit); "
            "past it new connections are closed at once", "N"),
    Setting("health_port", "--health-port", "MOE_EMBED_HEALTH_PORT", int,
            "plaintext port serving only grpc.health.v1, for probes that speak neither TLS nor "
            "API keys (the kubelet's); 0 disables", "PORT"),
    Setting("tls_cert_file", "--tls-cert-file", "MOE_EMBED_TLS_CERT_FILE", str,
            "PEM certificate chain: with --tls-key-file, gRPC and HTTP speak TLS only; re-read "
            "when the file changes or on SIGHUP", "FILE"),
    Setting("tls_key_file", "--tls-key-file", "MOE_EMBED_TLS_KEY_FILE", str,
            "PEM private key of --tls-cert-file", "FILE"),
    Setting("tls_client_ca_file", "--tls-client-ca-file", "MOE_EMBED_TLS_CLIENT_CA_FILE", str,
            "PEM CA bundle: mTLS, a client without a certificate signed by it is refused at "
            "the handshake", "FILE"),
    Setting("api_key_file", "--api-key-file", "MOE_EMBED_API_KEY_FILE", str,
            "file of API keys, one per line (blank lines and # comments ignored): every call "
            "but health needs `authorization: Bearer KEY`; re-read when it changes or on "
            "SIGHUP. Keys are never taken on the command line", "FILE"),
    Setting("reflection", "--reflection", "MOE_EMBED_REFLECTION", parse_bool,
            "gRPC server reflection (grpcurl without .proto files); --no-reflection turns it "
            "off"),
    Setting("served_model_name", "--served-model-name", "MOE_EMBED_SERVED_MODEL_NAME",
            parse_names,
            "names `model` may take (comma-separated; each also by its last /-part); the "
            "first is reported by /v1/models, Info and every response (empty: the bundle's "
            "model id: the checkpoint's hub id, or its folder name)", "NAME[,NAME]"),
    Setting("otlp_endpoint", "--otlp-endpoint", "MOE_EMBED_OTLP_ENDPOINT", str,
            "OpenTelemetry traces to this OTLP/gRPC endpoint (http://collector:4317); empty: "
            "the standard OTEL_EXPORTER_OTLP_ENDPOINT if set, else tracing is off; the other "
            "OTEL_* variables (sampler, service name, OTEL_SDK_DISABLED) apply", "URL"),
)


def machine_defaults(cores: int | None = None) -> dict[str, Any]:
    """Defaults of every setting on this machine (workers and threads from the cores)."""
    cores = cores or available_cores()
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    defaults["workers"] = default_workers(cores)
    defaults["threads_per_worker"] = default_threads(cores, defaults["workers"])
    return defaults


def add_arguments(parser: argparse.ArgumentParser, cores: int | None = None) -> None:
    """Register every setting as a flag whose help names its env var and default."""
    defaults = machine_defaults(cores)
    cores = cores or available_cores()
    for s in SETTINGS:
        default = defaults[s.name]
        if s.name == "workers":
            shown = f"{default}: one per 4 of the {cores} cores, at least 1"
        elif s.name == "threads_per_worker":
            shown = f"{default}: cores // workers"
        elif default in ("", ()):
            shown = "empty"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, float):
            shown = f"{default:g}"
        else:
            shown = str(default)
        if s.boolean:
            parser.add_argument(s.flag, dest=s.name, default=None,
                                action=argparse.BooleanOptionalAction,
                                help=f"{s.help} [env {s.env}; default {shown}]")
            continue
        parser.add_argument(
            s.flag,
            dest=s.name,
            default=None,
            metavar=s.metavar,
            help=f"{s.help} [env {s.env}; default {shown}]",
        )


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None,
            cores: int | None = None) -> ServeConfig:
    """Flag wins over env, env over the machine default. Raises ValueError naming the source
    of a bad value."""
    env = os.environ if env is None else env
    values = machine_defaults(cores)
    explicit = set()
    for s in SETTINGS:
        raw, source = getattr(args, s.name, None), s.flag
        if raw is None and env.get(s.env, "") != "":
            raw, source = env[s.env], s.env
        if raw is None:
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError:
            raise ValueError(f"{source}: cannot parse {raw!r} as {s.parse.__name__}") from None
        explicit.add(s.name)
    if "workers" in explicit and "threads_per_worker" not in explicit:
        values["threads_per_worker"] = default_threads(cores or available_cores(),
                                                       values["workers"])
    return ServeConfig(**values)
