"""serve's configuration: flag > env > default, defaults from the cores, --help says it all."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moe_embed.service import config
from moe_embed.service.cli import build_parser


def _parse(argv: list[str], cores: int = 2) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, cores)
    return parser.parse_args(argv)


def test_defaults_follow_the_table_and_the_core_count() -> None:
    cfg = config.resolve(_parse([]), env={}, cores=2)
    assert (cfg.bundle, cfg.host, cfg.port, cfg.metrics_port) == ("", "127.0.0.1", 50051, 9090)
    assert cfg.metrics_host == ""  # the same as host
    assert (cfg.batch_timeout_s, cfg.max_concurrent_streams, cfg.keepalive_s,
            cfg.max_connection_age_s) == (10.0, 128, 60.0, 0.0)
    assert (cfg.workers, cfg.threads_per_worker) == (1, 2)
    assert (cfg.max_batch_tokens, cfg.max_wait_ms, cfg.max_queue, cfg.max_inputs) == \
        (8192, 2.0, 4096, 256)
    assert (cfg.max_message_bytes, cfg.drain_grace_s, cfg.log_level) == (4194304, 20.0, "info")
    big = config.resolve(_parse([], 16), env={}, cores=16)
    assert (big.workers, big.threads_per_worker) == (4, 4)


def test_flag_beats_env_beats_default() -> None:
    env = {"MOE_EMBED_PORT": "6000", "MOE_EMBED_WORKERS": "3", "MOE_EMBED_MAX_WAIT_MS": "0.5"}
    cfg = config.resolve(_parse(["--port", "7000"]), env=env, cores=8)
    assert cfg.port == 7000  # flag
    assert cfg.workers == 3 and cfg.max_wait_ms == 0.5  # env
    assert cfg.threads_per_worker == 8 // 3  # follows the chosen worker count
    assert cfg.max_queue == 4096  # default


def test_bad_values_name_their_source() -> None:
    with pytest.raises(ValueError, match="MOE_EMBED_PORT"):
        config.resolve(_parse([]), env={"MOE_EMBED_PORT": "eighty"})
    with pytest.raises(ValueError, match="--workers"):
        config.resolve(_parse(["--workers", "many"]), env={})
    with pytest.raises(ValueError, match="workers=0"):
        config.resolve(_parse(["--workers", "0"]), env={})
    for nice in ("-1", "20"):  # raising niceness needs no privilege; lowering it would
        with pytest.raises(ValueError, match=f"worker_nice={nice}"):
            config.resolve(_parse(["--worker-nice", nice]), env={})
    assert config.resolve(_parse([]), env={"MOE_EMBED_WORKER_NICE": "0"}).worker_nice == 0
    assert config.resolve(_parse([]), env={}).worker_nice == config.WORKER_NICE


def test_help_documents_every_flag_with_env_and_default(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in config.SETTINGS:
        assert s.flag in text and f"env {s.env};" in text, s.flag
    assert text.count("default") >= len(config.SETTINGS)


def test_http_tls_keys_and_reflection_settings() -> None:
    cfg = config.resolve(_parse([]), env={}, cores=2)
    assert (cfg.http_port, cfg.health_port, cfg.reflection) == (8080, 0, True)
    assert (cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file, cfg.api_key_file) == \
        ("", "", "", "")
    assert not cfg.tls
    env = {"MOE_EMBED_REFLECTION": "false", "MOE_EMBED_HTTP_PORT": "0",
           "MOE_EMBED_TLS_CERT_FILE": "/tls/tls.crt", "MOE_EMBED_TLS_KEY_FILE": "/tls/tls.key",
           "MOE_EMBED_TLS_CLIENT_CA_FILE": "/tls/ca.crt", "MOE_EMBED_API_KEY_FILE": "/keys/k",
           "MOE_EMBED_HEALTH_PORT": "8081"}
    cfg = config.resolve(_parse([]), env=env)
    assert (cfg.reflection, cfg.http_port, cfg.health_port, cfg.tls) == (False, 0, 8081, True)
    assert cfg.api_key_file == "/keys/k" and cfg.tls_client_ca_file == "/tls/ca.crt"
    # a flag beats its variable, both ways for the boolean pair
    assert config.resolve(_parse(["--reflection"]), env=env).reflection is True
    assert config.resolve(_parse(["--no-reflection"]),
                          env={"MOE_EMBED_REFLECTION": "on"}).reflection is False
    with pytest.raises(ValueError, match="MOE_EMBED_REFLECTION"):
        config.resolve(_parse([]), env={"MOE_EMBED_REFLECTION": "maybe"})


def test_ports_must_differ_and_tls_files_go_together() -> None:
    with pytest.raises(ValueError, match="port and http_port are both 7000"):
        config.resolve(_parse(["--port", "7000", "--http-port", "7000"]), env={})
    with pytest.raises(ValueError, match="http_port and metrics_port"):
        config.resolve(_parse(["--http-port", "9090"]), env={})
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        config.resolve(_parse(["--tls-key-file", "k.pem"]), env={})
    config.resolve(_parse(["--http-port", "0", "--metrics-port", "0", "--port", "0"]), env={})


def test_no_api_key_on_the_command_line() -> None:
    """Keys come from a file (a Secret), never from argv where `ps` shows them."""
    flags = {s.flag for s in config.SETTINGS}
    assert "--api-key-file" in flags
    assert not {f for f in flags if "key" in f} - {"--api-key-file", "--tls-key-file"}


def test_readme_documents_every_flag_and_its_variable() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1]
    for s in config.SETTINGS:
        assert f"`{s.flag}" in table and f"`{s.env}`" in table, s.flag
