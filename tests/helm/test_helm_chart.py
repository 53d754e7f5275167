"""The Helm chart and the container image, proven without a cluster.

Every scenario is rendered with the real helm binary, linted, validated against the
Kubernetes schemas (1.29 to the newest kubernetes-validate knows), and checked against what
the server really reads: its config resolver parses the env the chart sets. The Dockerfile is
checked against pyproject.toml and values.yaml so the image runs what the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
from functools import cache
from pathlib import Path

import grpc
import kubernetes_validate
import promql_parser
import pytest
import requests
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate.utils import all_versions

from moe_embed.service import config as serve_config
from moe_embed.service.metrics import Metrics
from moe_embed.testing.helm_chart import (
    CHART,
    MISSING_HELM,
    NAMESPACE,
    RELEASE,
    REPO,
    Rendered,
    default_values,
    env_of,
    helm_path,
    leaf_keys,
    mount_at,
    render,
    run_helm,
)
from moe_embed.testing.helm_image import (
    dockerfile_named_stages,
    dockerfile_stages,
    dockerignored,
    last,
)
from moe_embed.testing.tls import Pki
from moe_embed.v1 import embedder_pb2, embedder_pb2_grpc
from moe_embed.workers.bundle.format import Bundle

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DASHBOARD = CHART / "dashboards" / "moe-embed.json"
FOOTPRINT = REPO / "benchmarks" / "results" / "footprint.json"
OLDEST_KUBERNETES = (1, 29)

# Custom resources have no schema in kubernetes-validate: each is checked by its own test,
# against the models cloudcoil generates from the published CRDs, and field by field.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                    ("keda.sh/v1alpha1", "ScaledObject")}

HUB_PVC = {
    "source": "hub",
    "hub": {
        "storage": "persistentVolumeClaim",
        "revision": "refs/pr/7",
        "moeMode": "all-experts",
        "token": {"existingSecret": "hf-token", "secretKey": "token"},
        "persistence": {"storageClass": "fast-rwx", "accessModes": ["ReadWriteMany"]},
    },
}

# name -> values overrides. Default values use the embedded demo model.
SCENARIOS: dict[str, dict] = {
    "default": {},
    "metrics-off": {"metrics": {"enabled": False}},
    "hub-emptydir-public": {"model": {"source": "hub"}},
    "hub-emptydir-token-value": {"model": {"source": "hub", "hub": {"token": {"value": "hf_x"}}}},
    "hub-pvc-existing-secret": {"model": HUB_PVC},
    "hub-int8": {"model": {"source": "hub", "precision": "int8"}},
    "hub-into-existing-pvc": {
        "model": {"source": "hub", "hub": {"storage": "persistentVolumeClaim",
                                           "persistence": {"existingClaim": "shared-models"}}},
    },
    "existing-claim": {
        "model": {"source": "existingClaim",
                  "existingClaim": {"claimName": "moe-bundles", "bundlePath": "nomic/routed"}},
    },
    "headless-off": {"headless": {"enabled": False}},
    "hpa": {"autoscaling": {"enabled": True}},
    "hpa-queue-depth": {"autoscaling": {"enabled": True, "queueDepth": {"enabled": True}}},
    "hpa-queue-tokens-only": {
        "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0,
                        "queueDepth": {"enabled": True, "metricName": "moe_embed_queue_tokens",
                                       "averageValue": "16384"}},
    },
    "keda": {
        "autoscaling": {"enabled": True, "keda": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "keda-own-query-no-cpu": {
        "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0, "maxReplicas": 30,
                        "behavior": {},
                        "keda": {"enabled": True, "threshold": "2",
                                 "serverAddress": "http://prometheus.obs.svc:9090",
                                 "query": "max(moe_embed_queue_oldest_wait_seconds"
                                          "{namespace=\"search\"})"}},
    },
    "dashboard": {"metrics": {"dashboard": {"enabled": True}}},
    "dashboard-elsewhere": {
        "metrics": {"dashboard": {"enabled": True, "namespace": "monitoring", "folder": "Search",
                                  "label": "grafana_dashboard_moe", "labelValue": "yes"}},
    },
    "image-bundle-int8": {"model": {"source": "image"}, "resourcesPreset": "int8"},
    "connection-age": {"server": {"maxConnectionAgeSeconds": 300, "keepaliveSeconds": 30}},
    "tracing": {"tracing": {"otlpEndpoint": "http://otel-collector.observability:4317",
                            "sampleRatio": "0.25"}},
    "servicemonitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    },
    "networkpolicy": {
        "networkPolicy": {
            "enabled": True,
            "restrictEgress": True,
            "grpcFrom": [{"podSelector": {"matchLabels": {"role": "search-api"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        },
    },
    "no-serviceaccount": {"serviceAccount": {"create": False}},
    "tls-and-keys": {
        "tls": {"enabled": True, "secretName": "embed-tls"},
        "apiKeys": {"enabled": True, "existingSecret": "embed-keys"},
    },
    "mtls-networkpolicy": {
        "tls": {"enabled": True, "secretName": "embed-tls", "clientAuth": True},
        "networkPolicy": {"enabled": True,
                          "httpFrom": [{"podSelector": {"matchLabels": {"role": "rag"}}}]},
    },
    "http-off-no-reflection": {"server": {"httpPort": 0, "reflection": False}},
    "custom-ports-explicit-workers": {
        "server": {"port": 6000, "drainGraceSeconds": 45, "workers": 2, "threadsPerWorker": 3},
        "metrics": {"port": 9100},
        "service": {"port": 443},
        "terminationGracePeriodSeconds": 60,
        "preStopSleepSeconds": 0,
    },
    "everything-operated": {
        "model": {"source": "image", "image": {"bundlePath": "/opt/bundles/nomic-int4"}},
        "resourcesPreset": "int4",
        "server": {"maxConnectionAgeSeconds": 600, "keepaliveSeconds": 45, "workers": 2},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                    "dashboard": {"enabled": True, "folder": "Embeddings"}},
        "autoscaling": {"enabled": True, "queueDepth": {"enabled": True},
                        "keda": {"enabled": True}},
        "tls": {"enabled": True, "secretName": "embed-tls"},
        "networkPolicy": {"enabled": True},
    },
    "everything": {
        "model": HUB_PVC,
        "server": {"port": 7000, "workers": 4, "httpPort": 7080, "healthPort": 7081},
        "service": {"httpPort": 80},
        "tls": {"enabled": True, "secretName": "embed-tls", "clientAuth": True,
                "mountPath": "/var/run/tls"},
        "apiKeys": {"enabled": True, "existingSecret": "embed-keys", "secretKey": "keys.txt"},
        "metrics": {"port": 9464, "serviceMonitor": {"enabled": True}},
        "autoscaling": {"enabled": True, "queueDepth": {"enabled": True}},
        "networkPolicy": {"enabled": True},
        "imagePullSecrets": [{"name": "regcred"}],
        "extraEnv": [{"name": "OMP_WAIT_POLICY", "value": "PASSIVE"}],
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "tolerations": [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/team": "search"},
    },
}


def kubernetes_versions() -> list[str]:
    """Every schema version kubernetes-validate ships from 1.29 on (none hard-coded)."""
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))
    return sorted({v for v in all_versions() if key(v)[:2] >= OLDEST_KUBERNETES}, key=key)


@pytest.fixture(scope="session")
def helm() -> Path:
    path = helm_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(MISSING_HELM.format(path=path), pytrace=False)
    return path


@cache
def _render(helm: Path, scenario: str) -> Rendered:
    return render(helm, SCENARIOS[scenario])


@pytest.fixture(params=sorted(SCENARIOS))
def rendered(request: pytest.FixtureRequest, helm: Path) -> Rendered:
    return _render(helm, request.param)


def all_containers(r: Rendered) -> list[dict]:
    return r.init_containers + r.pod_spec["containers"]


def resolve_server_config(env: dict) -> serve_config.ServeConfig:
    """What `moe-embed serve` makes of the chart's environment (no flags), on a 2-core box."""
    parser = argparse.ArgumentParser()
    serve_config.add_arguments(parser, cores=2)
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    return serve_config.resolve(parser.parse_args([]), env=plain, cores=2)


# ---- helm itself -------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(helm: Path, scenario: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), values=SCENARIOS[scenario])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_versions_cover_the_oldest_supported() -> None:
    versions = kubernetes_versions()
    assert versions[0] == "1.29.0", versions
    assert len(versions) >= 2, "kubernetes-validate should know releases newer than 1.29"


@pytest.mark.parametrize("version", kubernetes_versions())
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_manifests_match_kubernetes_schema(helm: Path, scenario: str, version: str) -> None:
    r = _render(helm, scenario)
    validated = 0
    for manifest in r.manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_RESOURCES:
            continue  # no core schema: test_servicemonitor_* checks it
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']} invalid on "
                        f"Kubernetes {version}: {exc.message} at {list(exc.path)}")
        validated += 1
    assert validated >= 4  # Deployment, Services, ServiceAccount or PDB at the least


def test_notes_show_an_in_cluster_grpcurl_call(helm: Path) -> None:
    proc = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    port = default_values()["service"]["port"]
    assert "grpcurl" in notes
    assert f"{RELEASE}-moe-embed.{NAMESPACE}.svc.cluster.local:{port}" in notes
    assert "moe_embed.v1.Embedder/Embed" in notes
    # the example request is one the server accepts: it parses against the real contract
    body = re.search(r"-d '([^']*)'", notes).group(1)
    request = json_format.Parse(body, embedder_pb2.EmbedRequest())
    assert request.inputs and request.task != embedder_pb2.TASK_UNSPECIFIED
    assert "round_robin" in notes and f"dns:///{RELEASE}-moe-embed-headless" in notes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"source": "s3"}}, "model.source must be demo, hub, existingClaim or image"),
        ({"model": {"source": "existingClaim"}}, "model.existingClaim.claimName is required"),
        ({"model": {"source": "hub", "hub": {"storage": "hostPath"}}}, "model.hub.storage"),
        ({"model": {"source": "hub", "hub": {"moeMode": "dense"}}}, "model.hub.moeMode"),
        ({"model": {"precision": "int3"}}, "model.precision must be fp32, int8 or int4"),
        ({"model": {"source": "hub", "precision": "int8", "hub": {"moeMode": "all-experts"}}},
         "all-experts is exported in fp32 only"),
        ({"terminationGracePeriodSeconds": 20}, "terminationGracePeriodSeconds (20) must exceed"),
        ({"metrics": {"port": 50051}}, "metrics.port and server.port must differ"),
        ({"server": {"httpPort": 9090}}, "metrics.port and server.httpPort must differ"),
        ({"tls": {"enabled": True, "secretName": "t"}, "server": {"healthPort": 8080}},
         "server.healthPort and server.httpPort must differ"),
        ({"tls": {"enabled": True}}, "tls.secretName is required"),
        ({"tls": {"clientAuth": True}}, "tls.clientAuth needs tls.enabled"),
        ({"apiKeys": {"enabled": True}}, "apiKeys.existingSecret is required"),
        ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
         "serviceMonitor.enabled needs metrics.enabled"),
        ({"model": {"source": "image", "image": {"bundlePath": "bundle"}}},
         "model.image.bundlePath must be an absolute path"),
        ({"resourcesPreset": "int3"}, "resourcesPreset must be fp32, int8, int4 or empty"),
        ({"tracing": {"otlpEndpoint": "http://c:4317", "sampleRatio": "1.5"}},
         "tracing.sampleRatio must be between 0 and 1"),
        ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}},
         "autoscaling needs a metric"),
        ({"autoscaling": {"enabled": True, "keda": {"enabled": True, "serverAddress": ""}}},
         "autoscaling.keda.serverAddress is required"),
    ],
    ids=["bad-source", "claim-missing", "bad-storage", "bad-moe-mode", "bad-precision",
         "all-experts-quantized", "short-grace", "port-clash", "http-port-clash",
         "health-port-clash", "tls-without-secret", "client-auth-without-tls",
         "keys-without-secret", "monitor-without-metrics", "image-bundle-relative",
         "bad-preset", "bad-sample-ratio", "hpa-without-metric", "keda-without-prometheus"],
)
def test_bad_values_fail_the_render_with_a_clear_message(
    helm: Path, overrides: dict, message: str
) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), values=overrides)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# ---- the server reads what the chart sets ------------------------------------------------


def test_ports_agree_across_values_env_container_and_probes(rendered: Rendered) -> None:
    v, server = rendered.values, rendered.server
    env = env_of(server)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    config = resolve_server_config(env)

    assert env["MOE_EMBED_PORT"] == str(v["server"]["port"])
    assert config.port == ports["grpc"] == v["server"]["port"]
    # the kubelet speaks no TLS: with TLS on, the probes ask the plaintext health port
    probe_port = config.health_port if config.tls else config.port
    assert probe_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == probe_port, probe
    assert ("health" in ports) == config.tls
    if config.tls:
        assert ports["health"] == config.health_port == v["server"]["healthPort"]
    assert config.http_port == v["server"]["httpPort"]
    assert ports.get("http", 0) == config.http_port
    if v["metrics"]["enabled"]:
        assert env["MOE_EMBED_METRICS_PORT"] == str(v["metrics"]["port"])
        assert config.metrics_port == ports["metrics"] == v["metrics"]["port"]
    else:
        assert config.metrics_port == 0 and "metrics" not in ports


def test_server_accepts_the_chart_environment(rendered: Rendered) -> None:
    env = env_of(rendered.server)
    known = {s.env for s in serve_config.SETTINGS}
    chart_settings = {k for k in env if k.startswith("MOE_EMBED_")}
    assert chart_settings <= known, f"not serve settings: {chart_settings - known}"

    v = rendered.values["server"]
    config = resolve_server_config(env)
    assert config.max_batch_tokens == v["maxBatchTokens"]
    assert config.max_wait_ms == v["maxWaitMs"]
    assert config.max_queue == v["maxQueue"]
    assert config.max_inputs == v["maxInputs"]
    assert config.max_message_bytes == v["maxMessageBytes"]
    assert config.drain_grace_s == v["drainGraceSeconds"]
    assert config.log_level == v["logLevel"]
    assert config.reflection == v["reflection"]
    assert config.max_connection_age_s == v["maxConnectionAgeSeconds"]
    assert config.keepalive_s == v["keepaliveSeconds"]
    assert config.cache_dir == rendered.values["cache"]["mountPath"]
    if v["workers"] != "":
        assert config.workers == v["workers"]
    if v["threadsPerWorker"] != "":
        assert config.threads_per_worker == v["threadsPerWorker"]


def kubelet_env(container: dict, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it: the pod's name from the downward
    API, and $(VAR) replaced by variables defined earlier in the list."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, entry
            env[entry["name"]] = pod_name
        else:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)",
                                        lambda m: env.get(m.group(1), m.group(0)), entry["value"])
    return env


def test_tracing_values_reach_the_server_and_the_otel_sdk(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint turns the server's tracing on; the sampler and the resource attributes are
    read by the OpenTelemetry SDK itself from the environment the kubelet gives the process."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import sampling

    t = rendered.values["tracing"]
    if not t["otlpEndpoint"]:
        env = env_of(rendered.server)
        assert resolve_server_config(env).otlp_endpoint == ""
        assert not [k for k in env if k.startswith("OTEL_")]
        return
    env = kubelet_env(rendered.server, "emb-moe-embed-6d4f-abcde")
    assert resolve_server_config(env).otlp_endpoint == t["otlpEndpoint"]
    for name, value in env.items():
        if name.startswith("OTEL_"):
            monkeypatch.setenv(name, value)
    sampler = sampling._get_from_env_or_default()
    assert isinstance(sampler, sampling.ParentBased)
    assert f"TraceIdRatioBased{{{float(t['sampleRatio'])}}}" in sampler.get_description()
    attributes = Resource.create({}).attributes
    assert attributes["service.name"] == rendered.one("Deployment")["metadata"]["name"]
    assert attributes["k8s.pod.name"] == "emb-moe-embed-6d4f-abcde"
    assert attributes["k8s.namespace.name"] == NAMESPACE


def test_chart_defaults_are_the_server_defaults(helm: Path) -> None:
    """With default values the pod runs with the same settings as a bare `moe-embed serve`
    (except where the pod must differ: a writable cache dir, and every interface to listen on
    where a bare server listens on loopback only)."""
    chart = resolve_server_config(env_of(_render(helm, "default").server))
    bare = resolve_server_config({})
    for field in ("bundle", "port", "metrics_port", "workers", "threads_per_worker",
                  "max_batch_tokens", "max_wait_ms", "max_queue", "max_inputs",
                  "max_message_bytes", "drain_grace_s", "batch_timeout_s", "log_level",
                  "http_port", "health_port", "tls_cert_file", "tls_key_file",
                  "tls_client_ca_file", "api_key_file", "reflection", "keepalive_s",
                  "max_connection_age_s", "otlp_endpoint"):
        assert getattr(chart, field) == getattr(bare, field), field
    assert (bare.host, chart.host) == ("127.0.0.1", "0.0.0.0")


def test_grace_period_outlasts_prestop_and_drain(rendered: Rendered) -> None:
    server = rendered.server
    drain = resolve_server_config(env_of(server)).drain_grace_s
    pre_stop = 0
    if "lifecycle" in server:
        command = server["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = int(command[1])
    assert rendered.pod_spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_probes_use_grpc_health_and_startup_is_generous(rendered: Rendered) -> None:
    server = rendered.server
    assert server["readinessProbe"]["grpc"]["service"] == "moe_embed.v1.Embedder"
    assert server["livenessProbe"]["grpc"]["service"] == ""
    startup = server["startupProbe"]
    assert "grpc" in startup
    # model load, or the demo model's first build, may take minutes on a busy node
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # the server reports NOT_SERVING while it drains: liveness must not kill it mid-drain
    liveness = server["livenessProbe"]
    drain = resolve_server_config(env_of(server)).drain_grace_s
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


# ---- security ----------------------------------------------------------------------------


def test_pods_are_locked_down(rendered: Rendered) -> None:
    spec = rendered.pod_spec
    pod_sc = spec["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    for c in all_containers(rendered):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc.get("runAsUser", pod_sc["runAsUser"]) != 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}, c["name"]
    for account in rendered.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == account["metadata"]["name"]


def test_writable_dirs_are_emptydirs(rendered: Rendered) -> None:
    spec = rendered.pod_spec
    for c in all_containers(rendered):
        env = env_of(c)
        for path in ("/tmp", env.get("MOE_EMBED_CACHE_DIR"), env.get("HF_HOME")):
            if path is None:
                continue
            mount, volume = mount_at(spec, c, path)
            assert not mount.get("readOnly"), (c["name"], path)
            assert "emptyDir" in volume, (c["name"], path, volume)


def test_tls_and_api_keys_are_files_of_whole_secret_volumes(rendered: Rendered) -> None:
    """The server reads TLS material and keys from the Secrets' files: mounted read-only and
    whole (a subPath mount never sees a rotated Secret); ca.crt only for mTLS."""
    tls, keys = rendered.values["tls"], rendered.values["apiKeys"]
    env, server = env_of(rendered.server), rendered.server
    config = resolve_server_config(env)
    secrets = {v["name"]: v["secret"] for v in rendered.pod_spec["volumes"] if "secret" in v}
    expected = {}
    if tls["enabled"]:
        expected["tls"] = tls["secretName"]
        files = {"tls.crt": config.tls_cert_file, "tls.key": config.tls_key_file}
        if tls["clientAuth"]:
            files["ca.crt"] = config.tls_client_ca_file
        else:
            assert not config.tls_client_ca_file
        for item, path in files.items():
            mount, volume = mount_at(rendered.pod_spec, server, path)
            assert volume["secret"]["secretName"] == tls["secretName"]
            assert path == f"{mount['mountPath']}/{item}"
            assert item in {i["path"] for i in volume["secret"]["items"]}
    else:
        assert not config.tls and "MOE_EMBED_TLS_CERT_FILE" not in env
    if keys["enabled"]:
        expected["api-keys"] = keys["existingSecret"]
        mount, volume = mount_at(rendered.pod_spec, server, config.api_key_file)
        assert volume["secret"]["secretName"] == keys["existingSecret"]
        assert config.api_key_file == f"{mount['mountPath']}/{keys['secretKey']}"
    else:
        assert not config.api_key_file
    assert {name: s["secretName"] for name, s in secrets.items()} == expected
    for mount in server["volumeMounts"]:
        if mount["name"] in secrets:
            assert mount["readOnly"] is True and "subPath" not in mount


# ---- model provisioning ------------------------------------------------------------------


def test_model_provisioning(rendered: Rendered) -> None:
    source = rendered.values["model"]["source"]
    {"demo": check_demo, "hub": check_hub, "existingClaim": check_existing_claim,
     "image": check_image}[source](rendered)


def check_demo(r: Rendered) -> None:
    env = env_of(r.server)
    assert "MOE_EMBED_BUNDLE" not in env and not r.init_containers
    assert resolve_server_config(env).bundle == ""  # the embedded demo model
    # the demo model is built at first start under the cache dir: it must be writable
    mount, volume = mount_at(r.pod_spec, r.server, env["MOE_EMBED_CACHE_DIR"])
    assert "emptyDir" in volume and not mount.get("readOnly")
    assert not r.of_kind("PersistentVolumeClaim") and not r.of_kind("Secret")


def check_hub(r: Rendered) -> None:
    hub = r.values["model"]["hub"]
    (init,) = r.init_containers
    init_env, server_env = env_of(init), env_of(r.server)
    assert init["image"] == r.server["image"]
    assert init_env["HUB_MODEL_ID"] == hub["id"]
    assert init_env["HUB_REVISION"] == hub["revision"]
    assert init_env["MOE_MODE"] == hub["moeMode"]
    assert init_env["PRECISION"] == r.values["model"]["precision"]
    assert 'moe-embed export "$HUB_MODEL_ID"' in init["args"][0]
    for line in init["args"][0].splitlines():
        if "moe-embed export" in line:  # every export the script may run takes the precision
            assert '--precision "$PRECISION"' in line, line
    assert init["resources"] == hub["resources"]

    bundle = server_env["MOE_EMBED_BUNDLE"]
    assert init_env["BUNDLE_DIR"] == bundle
    init_mount, volume = mount_at(r.pod_spec, init, bundle)
    server_mount, server_volume = mount_at(r.pod_spec, r.server, bundle)
    assert volume is server_volume and volume["name"] == "model"
    assert not init_mount.get("readOnly") and server_mount["readOnly"] is True
    assert init_mount["mountPath"] == server_mount["mountPath"]

    claims = r.of_kind("PersistentVolumeClaim")
    if hub["storage"] == "emptyDir":
        assert "emptyDir" in volume and not claims
    elif hub["persistence"]["existingClaim"]:
        assert volume["persistentVolumeClaim"]["claimName"] == hub["persistence"]["existingClaim"]
        assert not claims
    else:
        (claim,) = claims
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["spec"]["accessModes"] == hub["persistence"]["accessModes"]
        assert claim["spec"]["resources"]["requests"]["storage"] == hub["persistence"]["size"]

    token, secrets = hub["token"], r.of_kind("Secret")
    if token["existingSecret"]:
        ref = init_env["HF_TOKEN"]["secretKeyRef"]
        assert ref == {"name": token["existingSecret"], "key": token["secretKey"]}
        assert not secrets
    elif token["value"]:
        (secret,) = secrets
        ref = init_env["HF_TOKEN"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": token["secretKey"]}
        assert secret["stringData"] == {token["secretKey"]: token["value"]}
        assert "checksum/hub-token" in r.pod["metadata"]["annotations"]
    else:
        assert "HF_TOKEN" not in init_env and not secrets
    assert "HF_TOKEN" not in server_env  # only the export talks to the hub


def check_existing_claim(r: Rendered) -> None:
    claim = r.values["model"]["existingClaim"]
    env = env_of(r.server)
    mount, volume = mount_at(r.pod_spec, r.server, env["MOE_EMBED_BUNDLE"])
    assert volume["persistentVolumeClaim"] == {"claimName": claim["claimName"], "readOnly": True}
    assert mount["readOnly"] is True
    assert env["MOE_EMBED_BUNDLE"] == f"{mount['mountPath']}/{claim['bundlePath']}"
    assert not r.init_containers and not r.of_kind("PersistentVolumeClaim")


def check_image(r: Rendered) -> None:
    """The bundle is in the image: no volume, no export, no claim; the server loads the path
    the Dockerfile's bundled target copies it to (unless bundlePath says otherwise)."""
    env = env_of(r.server)
    assert env["MOE_EMBED_BUNDLE"] == r.values["model"]["image"]["bundlePath"]
    assert resolve_server_config(env).bundle == env["MOE_EMBED_BUNDLE"]
    assert "model" not in {v["name"] for v in r.pod_spec["volumes"]}
    assert "model" not in {m["name"] for m in r.server["volumeMounts"]}
    assert not r.init_containers and not r.of_kind("PersistentVolumeClaim")
    assert not r.of_kind("Secret")


def test_hub_bundle_dir_changes_with_what_is_exported(helm: Path) -> None:
    """On a PVC, a new revision, MoE mode or precision must export anew, not reuse the old
    bundle; fp32 keeps the directory name it had before precisions existed."""
    def bundle_dir(model: dict) -> str:
        return env_of(render(helm, {"model": {"source": "hub", **model}}).server)[
            "MOE_EMBED_BUNDLE"]

    dirs = [bundle_dir({"hub": hub}) for hub in ({}, {"revision": "v2"},
                                                 {"moeMode": "all-experts"}, {"id": "org/other"})]
    dirs += [bundle_dir({"precision": p}) for p in ("int8", "int4")]
    assert len(set(dirs)) == 6, dirs
    assert dirs[0].endswith("/nomic-ai_nomic-embed-text-v2-moe--default--routed")
    assert bundle_dir({"precision": "fp32"}) == dirs[0]
    assert dirs[4].endswith("--routed--int8")


# ---- services, scaling, monitoring -------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_route_to_the_server_ports(rendered: Rendered) -> None:
    v = rendered.values
    pod_labels = rendered.pod["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in rendered.server["ports"]}
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    main = services.pop(f"{RELEASE}-moe-embed")
    headless = services.pop(f"{RELEASE}-moe-embed-headless", None)
    assert not services, f"unexpected Services {list(services)}"

    for service in filter(None, (main, headless)):
        assert selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, port
    main_ports = {p["name"]: p["port"] for p in main["spec"]["ports"]}
    assert main["spec"]["type"] == v["service"]["type"]
    assert main_ports["grpc"] == v["service"]["port"]
    assert ("metrics" in main_ports) == v["metrics"]["enabled"]
    assert ("http" in main_ports) == (v["server"]["httpPort"] != 0)
    if "http" in main_ports:
        assert main_ports["http"] == v["service"]["httpPort"]
    assert "health" not in main_ports  # the kubelet probes the pod, not the Service

    assert (headless is not None) == v["headless"]["enabled"]
    if headless:
        assert headless["spec"]["clusterIP"] == "None"
        assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {
            "grpc": v["server"]["port"]  # clients dial pod IPs: the container port
        }


def test_replicas_or_autoscaler(rendered: Rendered) -> None:
    a = rendered.values["autoscaling"]
    deployment = rendered.one("Deployment")
    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    scaled = rendered.of_kind("ScaledObject")
    if not a["enabled"]:
        assert not hpas and not scaled
        assert deployment["spec"]["replicas"] == rendered.values["replicaCount"]
        return
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    if a["keda"]["enabled"]:
        assert not hpas and len(scaled) == 1  # KEDA makes the HPA; two would fight
        return  # test_scaledobject_* checks it
    assert not scaled
    (hpa,) = hpas
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        a["minReplicas"], a["maxReplicas"])
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert len(metrics) == len(hpa["spec"]["metrics"]) >= 1
    assert ("Resource" in metrics) == (a["targetCPUUtilizationPercentage"] > 0)
    if "Resource" in metrics:
        cpu = metrics["Resource"]["resource"]
        assert cpu["name"] == "cpu"
        assert cpu["target"]["averageUtilization"] == a["targetCPUUtilizationPercentage"]
    assert ("Pods" in metrics) == a["queueDepth"]["enabled"]
    if a["queueDepth"]["enabled"]:
        pods = metrics["Pods"]["pods"]
        assert pods["metric"]["name"] == a["queueDepth"]["metricName"]
        assert pods["target"] == {"type": "AverageValue",
                                  "averageValue": a["queueDepth"]["averageValue"]}


def test_disruption_budget_and_spread_select_the_pods(rendered: Rendered) -> None:
    pod_labels = rendered.pod["metadata"]["labels"]
    (pdb,) = rendered.of_kind("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == rendered.values["podDisruptionBudget"]["maxUnavailable"]
    (spread,) = rendered.pod_spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert selects(spread["labelSelector"]["matchLabels"], pod_labels)


def test_network_policy_opens_only_the_server_ports(rendered: Rendered) -> None:
    n = rendered.values["networkPolicy"]
    policies = rendered.of_kind("NetworkPolicy")
    assert bool(policies) == n["enabled"]
    if not policies:
        return
    (policy,) = policies
    assert selects(policy["spec"]["podSelector"]["matchLabels"], rendered.pod["metadata"]["labels"])
    container_ports = {p["name"] for p in rendered.server["ports"]}
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert opened == container_ports
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert by_port["grpc"].get("from", []) == n["grpcFrom"]
    if "http" in by_port:
        assert by_port["http"].get("from", []) == n["httpFrom"]
    assert ("Egress" in policy["spec"]["policyTypes"]) == n["restrictEgress"]
    if n["restrictEgress"]:
        egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert {53, 443} <= egress_ports  # DNS, and HTTPS for the hub export


def test_queue_depth_metric_is_a_gauge_the_server_exports() -> None:
    """The HPA example scales on a metric the server really serves (via an adapter)."""
    name = default_values()["autoscaling"]["queueDepth"]["metricName"]
    families = {m.name: m.type for m in Metrics().registry.collect()}
    assert families.get(name) == "gauge", f"{name} not among {sorted(families)}"


DURATION = re.compile(r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")  # the Prometheus Operator's form


def test_servicemonitor_scrapes_the_metrics_port_once(rendered: Rendered) -> None:
    """ServiceMonitor is a custom resource: checked here structurally, not by schema."""
    m = rendered.values["metrics"]
    monitors = rendered.of_kind("ServiceMonitor")
    assert bool(monitors) == (m["enabled"] and m["serviceMonitor"]["enabled"])
    if not monitors:
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(m["serviceMonitor"]["labels"], monitor["metadata"]["labels"])
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])

    scraped = [
        s for s in rendered.of_kind("Service")
        if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        and any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])
    ]
    assert len(scraped) == 1, "each pod must be scraped through exactly one Service"
    (port,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "metrics"


def crd_round_trip(model: type, manifest: dict) -> None:
    """A custom resource against the pydantic model cloudcoil generates from its published
    CRD: types and required fields are checked, and a field the CRD does not know (which the
    model would drop) or a value it would coerce fails the comparison."""
    dumped = model.model_validate(manifest).model_dump(by_alias=True, exclude_unset=True,
                                                       mode="json")
    assert dumped == manifest, f"{manifest['kind']} does not match its CRD's schema"


def test_servicemonitor_matches_its_crd(rendered: Rendered) -> None:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    for monitor in rendered.of_kind("ServiceMonitor"):
        crd_round_trip(ServiceMonitor, monitor)


def test_scaledobject_scales_the_deployment_on_the_queue(rendered: Rendered) -> None:
    """KEDA's ScaledObject (a custom resource): against its CRD's model, then field by field."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    a = rendered.values["autoscaling"]
    objects = rendered.of_kind("ScaledObject")
    assert bool(objects) == (a["enabled"] and a["keda"]["enabled"])
    if not objects:
        return
    (scaled,) = objects
    crd_round_trip(ScaledObject, scaled)
    spec = scaled["spec"]
    deployment = rendered.one("Deployment")
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (a["minReplicas"],
                                                                  a["maxReplicas"])
    assert spec["pollingInterval"] == a["keda"]["pollingInterval"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    assert behavior == (a["behavior"] or None)
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert len(triggers) == len(spec["triggers"])
    prometheus = triggers.pop("prometheus")
    assert prometheus["metricType"] == "AverageValue"  # the query's total / replicas
    meta = prometheus["metadata"]
    assert meta["serverAddress"] == a["keda"]["serverAddress"]
    assert meta["threshold"] == a["keda"]["threshold"]
    promql_parser.parse(meta["query"])  # KEDA would reject what Prometheus cannot parse
    if a["keda"]["query"]:
        assert meta["query"] == a["keda"]["query"]
    else:
        check_default_keda_query(rendered, meta["query"])
    if a["targetCPUUtilizationPercentage"] > 0:
        cpu = triggers.pop("cpu")
        assert cpu["metricType"] == "Utilization"
        assert cpu["metadata"] == {"value": str(a["targetCPUUtilizationPercentage"])}
    assert not triggers


def check_default_keda_query(r: Rendered, query: str) -> None:
    """The default query sums the queue gauge over the series a ServiceMonitor scrape of this
    release produces: the Prometheus Operator labels them with the namespace and, as job, the
    name of the Service it scraped."""
    expr = promql_parser.parse(query)
    assert isinstance(expr, promql_parser.AggregateExpr) and str(expr.op) == "sum", query
    assert not expr.modifier  # the release's total, not per pod
    selector = expr.expr
    assert isinstance(selector, promql_parser.VectorSelector)
    assert selector.name == r.values["autoscaling"]["queueDepth"]["metricName"]
    matchers = {m.name: m.value for m in selector.matchers.matchers}
    assert all(m.op == promql_parser.MatchOp.Equal for m in selector.matchers.matchers)
    (monitored,) = [
        s for s in r.of_kind("Service")
        if any(p["name"] == "metrics" for p in s["spec"]["ports"])
    ]
    assert matchers == {"namespace": NAMESPACE, "job": monitored["metadata"]["name"]}


def test_dashboard_configmap_ships_the_repo_file(rendered: Rendered) -> None:
    """One source: the ConfigMap carries helm/dashboards/moe-embed.json as it is in the repo,
    labelled for Grafana's dashboard sidecar."""
    d = rendered.values["metrics"]["dashboard"]
    maps = [m for m in rendered.of_kind("ConfigMap")
            if m["metadata"]["name"].endswith("-dashboard")]
    assert bool(maps) == d["enabled"]
    if not maps:
        return
    (config_map,) = maps
    meta = config_map["metadata"]
    assert meta["labels"][d["label"]] == d["labelValue"]
    assert meta["namespace"] == (d["namespace"] or NAMESPACE)
    assert meta.get("annotations", {}).get("grafana_folder") == (d["folder"] or None)
    (name, text), = config_map["data"].items()
    assert name.endswith(".json")
    assert text == DASHBOARD.read_text().rstrip("\n")
    assert json.loads(text)["uid"]


# The frontend's RSS for about a second while it loads the tokenizer (benchmarks/README.md,
# "Footprint and start time": HF loads it once, then the compact vocabulary replaces it).
FRONTEND_LOAD_PEAK_MB = 460


def quantity_mib(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * factor
    return float(quantity) / 2**20


@pytest.mark.parametrize("preset", ["fp32", "int8", "int4"])
def test_resource_presets_cover_the_measured_footprint(helm: Path, preset: str) -> None:
    """Each preset against benchmarks/footprint.py's figures for one worker of that precision
    (benchmarks/results/footprint.json), by the rule values.yaml states: the request holds the
    idle footprint; the limit holds the footprint under W3 load plus the frontend's surplus
    while it loads the tokenizer, plus 20%."""
    rounds = [r for r in json.loads(FOOTPRINT.read_text())["rounds"]
              if r["config"] == preset and r["workers"] == 1]
    assert rounds, f"no {preset} figures in {FOOTPRINT}"
    mib = 1e6 / 2**20
    idle = max(r["total_pss_mb"] for r in rounds) * mib
    surplus = FRONTEND_LOAD_PEAK_MB - min(r["frontend_rss_mb"] for r in rounds)
    loaded = (max(r["total_pss_after_w3_mb"] for r in rounds) + surplus) * mib
    resources = render(helm, {"resourcesPreset": preset}).server["resources"]
    request = quantity_mib(resources["requests"]["memory"])
    limit = quantity_mib(resources["limits"]["memory"])
    assert idle <= request <= limit and loaded * 1.2 <= limit, (preset, idle, request, loaded)
    # CPU as the figures were measured: 2 cores, which size one worker by default
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "2"


def test_no_preset_keeps_the_resources_value(helm: Path) -> None:
    own = {"requests": {"cpu": "3", "memory": "5Gi"}, "limits": {"cpu": "4", "memory": "7Gi"}}
    assert render(helm, {"resources": own}).server["resources"] == own
    assert render(helm, {}).server["resources"] == default_values()["resources"]


# ---- the init container's export script, run for real ------------------------------------


def test_export_init_script_exports_once_and_reuses_the_bundle(
    helm: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The rendered init script runs the real `moe-embed export` (on a local synthetic
    checkpoint instead of a hub id) into a volume, then finds the bundle there next time."""
    moe_embed = shutil.which("moe-embed", path=str(REPO / ".venv" / "bin")) or shutil.which(
        "moe-embed")
    assert moe_embed, "the moe-embed console script is not installed (pip install -e .)"
    checkpoint = tiny_checkpoint

    r = render(helm, {"model": {"source": "hub", "hub": {"id": str(checkpoint)}}})
    (init,) = r.init_containers
    env = {k: v for k, v in env_of(init).items() if isinstance(v, str)}
    mount, _ = mount_at(r.pod_spec, init, env["BUNDLE_DIR"])
    volume = tmp_path / "volume"
    volume.mkdir()
    env["BUNDLE_DIR"] = env["BUNDLE_DIR"].replace(mount["mountPath"], str(volume), 1)
    env["MOE_EMBED_CACHE_DIR"] = env["HF_HOME"] = str(tmp_path / "cache")
    env |= {"PATH": f"{Path(moe_embed).parent}:{os.environ['PATH']}", "HOSTNAME": "pod-a"}

    def run_init() -> str:
        proc = subprocess.run([*init["command"], init["args"][0]], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "bundle exported" in run_init()
    bundle = Path(env["BUNDLE_DIR"])
    assert Bundle.load(bundle, verify=True).manifest.moe_mode == env["MOE_MODE"]
    assert [p.name for p in volume.iterdir()] == [bundle.name]  # no partial dir left behind
    before = (bundle / "manifest.json").stat().st_mtime_ns
    assert "already exported" in run_init()
    assert (bundle / "manifest.json").stat().st_mtime_ns == before


# ---- the pod's command, run for real and probed like the kubelet ---------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pod_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pod's cache emptyDir, shared by the pod runs so the demo model is built once."""
    return tmp_path_factory.mktemp("pod-cache")


def mount_secrets(r: Rendered, env: dict[str, str], root: Path, pki: Pki) -> None:
    """What the kubelet does for the chart's Secret volumes: each volume's items as files in a
    directory, mounted where the container says; env paths into them follow the mount."""
    contents = {"tls.crt": b"".join(b.bytes() for b in pki.server.cert_chain_pems),
                "tls.key": pki.server.private_key_pem.bytes(),
                "ca.crt": pki.ca.cert_pem.bytes(),
                r.values["apiKeys"]["secretKey"]: f"# test keys\n{POD_API_KEY}\n".encode()}
    for mount in r.server["volumeMounts"]:
        secret = r.volume(mount["name"]).get("secret")
        if secret is None:
            continue
        assert mount["readOnly"] is True and "subPath" not in mount  # or rotation is lost
        directory = root / mount["name"]
        directory.mkdir(parents=True)
        for item in secret["items"]:
            (directory / item["path"]).write_bytes(contents[item["key"]])
        for name, value in env.items():
            if value.startswith(mount["mountPath"] + "/"):
                env[name] = str(directory) + value[len(mount["mountPath"]):]


POD_API_KEY = "sk-pod-test-key"
POD_MODES = {
    "defaults": {},
    # everything on: mTLS and API keys; the kubelet's plaintext probes must still pass
    "mtls-and-keys": {"tls": {"enabled": True, "secretName": "embed-tls", "clientAuth": True},
                      "apiKeys": {"enabled": True, "existingSecret": "embed-keys"}},
}


@pytest.mark.parametrize("mode", list(POD_MODES))
def test_pod_command_serves_probes_metrics_and_calls_on_the_chart_ports(
    helm: Path, tmp_path: Path, pod_cache: Path, mode: str
) -> None:
    """The image's entrypoint with the container's args, env and Secret files (demo model)
    answers the kubelet's gRPC probes on the probe port (plaintext, no key, whatever TLS and
    keys are on), serves /metrics, serves a real call on the gRPC and HTTP ports the way a
    client of that configuration makes it, and drains within the grace period."""
    r = render(helm, {**POD_MODES[mode],
                      "server": {"port": free_port(), "httpPort": free_port(),
                                 "healthPort": free_port()},
                      "metrics": {"port": free_port()}})
    server = r.server
    env = {k: v for k, v in env_of(server).items() if isinstance(v, str)}
    env["MOE_EMBED_CACHE_DIR"] = str(pod_cache)  # the pod's emptyDir
    env["HF_HOME"] = str(pod_cache / "huggingface")
    env |= {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    pki = Pki.make(tmp_path / "pki")
    mount_secrets(r, env, tmp_path / "secrets", pki)
    (entrypoint,) = json.loads(last(dockerfile_stages()[-1], "ENTRYPOINT"))
    binary = shutil.which(entrypoint, path=str(REPO / ".venv" / "bin")) or entrypoint
    log_path = tmp_path / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen([binary, *server["args"]], env=env, stdout=log, stderr=log)

    def check(probe: dict) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{probe['grpc']['port']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe["grpc"]["service"]),
                timeout=probe["timeoutSeconds"])
            return reply.status

    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()}"
            try:
                if check(server["startupProbe"]) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "never became SERVING"
            time.sleep(0.5)
        for probe in ("readinessProbe", "livenessProbe"):
            assert check(server[probe]) == health_pb2.HealthCheckResponse.SERVING, probe
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics",
                                    timeout=10) as reply:
            assert b"moe_embed_queue_depth" in reply.read()

        tls, keys = r.values["tls"]["enabled"], r.values["apiKeys"]["enabled"]
        headers = {"Authorization": f"Bearer {POD_API_KEY}"} if keys else {}
        metadata = (("authorization", headers["Authorization"]),) if keys else ()
        grpc_target = f"127.0.0.1:{ports['grpc']}"
        channel = (pki.channel(ports["grpc"]) if tls else grpc.insecure_channel(grpc_target))
        with channel:
            reply = embedder_pb2_grpc.EmbedderStub(channel).Embed(
                embedder_pb2.EmbedRequest(inputs=["hello"], task=embedder_pb2.TASK_NONE),
                metadata=metadata, timeout=30)
            assert len(reply.embeddings) == 1
        url = f"{'https' if tls else 'http'}://127.0.0.1:{ports['http']}/v1/embeddings"
        client = pki.requests_kwargs() if tls else {}
        reply = requests.post(url, json={"input": ["hello"]}, headers=headers, timeout=30,
                              **client)
        assert reply.status_code == 200 and len(reply.json()["data"]) == 1
        if keys:
            assert requests.post(url, json={"input": ["hello"]}, timeout=30,
                                 **client).status_code == 401

        proc.send_signal(signal.SIGTERM)  # after preStop: what the kubelet sends
        grace = r.pod_spec["terminationGracePeriodSeconds"]
        assert proc.wait(timeout=grace) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# ---- chart metadata and docs -------------------------------------------------------------


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == PYPROJECT["project"]["version"]


def test_chart_readme_requests_match_the_contracts() -> None:
    """grpcurl bodies parse as EmbedRequest; curl bodies (to /v1/embeddings) as the HTTP
    API's request."""
    from moe_embed.service.http.schema import EmbeddingRequest

    commands = re.split(r"\n(?=\S)|\n\s*\n", (CHART / "README.md").read_text())
    grpcurl = [b for c in commands if "grpcurl" in c for b in re.findall(r"-d '([^']*)'", c)]
    curl = [b for c in commands if "/v1/embeddings" in c
            for b in re.findall(r"-d '([^']*)'", c)]
    assert grpcurl and curl
    for body in grpcurl:
        request = json_format.Parse(body, embedder_pb2.EmbedRequest())
        assert request.inputs and request.task != embedder_pb2.TASK_UNSPECIFIED, body
    for body in curl:
        assert EmbeddingRequest.model_validate_json(body).input, body


def test_every_value_is_documented_in_the_chart_readme() -> None:
    readme = (CHART / "README.md").read_text()
    missing = [k for k in leaf_keys(default_values()) if f"`{k}`" not in readme]
    assert not missing, f"values missing from helm/README.md: {missing}"


# ---- the container image -----------------------------------------------------------------


def test_image_runs_the_console_script_as_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile should be multi-stage"
    runtime = stages[-1]
    uid = last(runtime, "USER").split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    assert int(uid) == default_values()["podSecurityContext"]["runAsUser"]
    entrypoint = json.loads(last(runtime, "ENTRYPOINT"))
    assert entrypoint == ["moe-embed"] and "moe-embed" in PYPROJECT["project"]["scripts"]
    assert json.loads(last(runtime, "CMD")) == ["serve"]


def test_image_ports_and_cache_match_the_chart() -> None:
    v = default_values()
    runtime = dockerfile_stages()[-1]
    exposed = {int(p.split("/")[0]) for _, rest in runtime if _ == "EXPOSE" for p in rest.split()}
    assert exposed == {v["server"]["port"], v["server"]["httpPort"], v["metrics"]["port"]}
    env = " ".join(rest for ins, rest in runtime if ins == "ENV")
    assert f"MOE_EMBED_CACHE_DIR={v['cache']['mountPath']}" in env.split()


def test_image_installs_the_tested_package_with_cpu_torch() -> None:
    build = [rest for stage in dockerfile_stages()[:-1] for ins, rest in stage if ins == "RUN"]
    (torch_pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    torch_install = [r for r in build if "torch" in r]
    assert torch_install and torch_pin.replace(" ", "") in shlex.split(torch_install[0])
    assert "https://download.pytorch.org/whl/cpu" in torch_install[0]
    package_installs = [shlex.split(r) for r in build if re.search(r"pip install .*\.$", r)]
    assert package_installs and "-e" not in package_installs[0], "install the package, not -e"


def test_image_copies_every_package_source_and_dockerignore_keeps_them() -> None:
    copied = [
        rest.split()[:-1] for stage in dockerfile_stages() for ins, rest in stage
        if ins == "COPY" and not rest.startswith("--from")
    ]
    sources = [s.rstrip("/") for args in copied for s in args]
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"],
              *PYPROJECT["tool"]["setuptools"]["package-dir"].values()]
    for path in needed:
        assert any(path == s or path.startswith(s + "/") for s in sources), f"{path} not copied"
        assert not dockerignored(path), f"{path} is excluded by .dockerignore"
    # moe_embed.testing's folder is let back in (`!tests/support`), not the tests or caches
    assert dockerignored("tests/service/test_cli.py")
    assert dockerignored("tests/support/__pycache__/service.cpython-311.pyc")


def test_bundled_target_bakes_in_the_bundle_that_model_source_image_serves(
    tiny_bundle: Path,
) -> None:
    """`docker build --target bundled --build-arg BUNDLE=DIR` copies an exported bundle to
    the path the chart's image source loads; `docker build .` still builds the image without
    one. Read, not built: no docker engine runs in the tests."""
    stages = dockerfile_named_stages()
    bundled = stages["bundled"]
    (arg,) = [rest for ins, rest in bundled if ins == "ARG" and rest.startswith("BUNDLE")]
    default_bundle = arg.partition("=")[2]
    assert default_bundle.startswith("bundles/")
    (copy,) = [shlex.split(rest) for ins, rest in bundled if ins == "COPY" and "BUNDLE" in rest]
    assert copy[0] in ("${BUNDLE}", "$BUNDLE")
    destination = copy[-1]
    env = dict(e.split("=", 1) for ins, rest in bundled if ins == "ENV" for e in rest.split())
    assert env["MOE_EMBED_BUNDLE"] == destination
    assert destination == default_values()["model"]["image"]["bundlePath"]
    # the bundled image is the server image plus the bundle: same user, entrypoint, ports
    runtime = dockerfile_stages()[-1]
    for instruction in ("USER", "ENTRYPOINT", "CMD", "EXPOSE"):
        assert last(bundled, instruction) == last(runtime, instruction), instruction
    assert not any("BUNDLE" in rest for _, rest in runtime), "the default image has no bundle"

    # every file of a real export reaches the build context; an unfinished export does not
    files = [p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*")
             if p.is_file()]
    assert "manifest.json" in files
    for name in files:
        assert not dockerignored(f"{default_bundle}/{name}"), f"{name} left out of the context"
    assert dockerignored(f"{default_bundle}.partial/manifest.json")
    assert dockerignored(".venv/bin/python") and not dockerignored("service/server.py")
