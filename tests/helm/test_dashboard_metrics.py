"""The Grafana dashboard and the autoscaling queries read what the service really exports.

A real `moe-embed serve` (tiny bundle) gets traffic on gRPC and HTTP, a refused request, an
input long enough to be truncated, and loses a worker to SIGKILL, so that every counter and
histogram the queries read has samples. Then every PromQL query of the dashboard (panel
targets and template variables), of the prometheus-adapter rule and of the chart's KEDA
trigger is parsed, and each metric and label it names is looked up in the scraped /metrics.
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import promql_parser
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from moe_embed.testing.helm_chart import CHART, NAMESPACE, RELEASE, default_values, render
from moe_embed.testing.service import ServeProcess, wait_for
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

DASHBOARD = CHART / "dashboards" / "moe-embed.json"
ADAPTER_RULES = CHART / "examples" / "prometheus-adapter.yaml"
# Labels Prometheus adds when it scrapes a pod (the target's), never in /metrics itself.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container"}
# What issue 26 asks the dashboard to show, by the metric each panel must read.
REQUIRED = {
    "moe_embed_requests_total": "requests/s by method",
    "moe_embed_batch_size_tokens_sum": "tokens/s",
    "moe_embed_request_latency_seconds_bucket": "latency percentiles",
    "moe_embed_queue_depth": "queue: inputs waiting",
    "moe_embed_queue_tokens": "queue: tokens waiting",
    "moe_embed_worker_slots_busy": "busy workers",
    "moe_embed_worker_restarts_total": "worker restarts",
    "moe_embed_truncated_inputs_total": "truncated inputs",
    "moe_embed_expert_tokens_total": "expert-load heatmap",
}


class Exported:
    """One scrape of /metrics: sample names with their label names, and family types."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, set[str]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)

    def check_selector(self, selector: promql_parser.VectorSelector, where: str) -> str:
        """The selector's metric has samples, and every label it matches on exists."""
        name = selector.name
        assert name in self.labels, f"{where}: {name} is not exported (have: {sorted(self.labels)})"
        for matcher in selector.matchers.matchers:
            assert matcher.name in self.labels[name] | TARGET_LABELS, (
                f"{where}: {name} has no label {matcher.name!r}")
        return name


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    log = tmp_path_factory.mktemp("dashboard") / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "2", "--threads-per-worker", "1") as server:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            long_text = " ".join(["truncate me"] * 4000)  # past the model's context
            for inputs in (["hello world"], ["a", "b", "c"], [long_text]):
                stub.Embed(pb.EmbedRequest(inputs=inputs, task=pb.TASK_SEARCH_QUERY), timeout=60)
            with pytest.raises(grpc.RpcError):  # counted as an error, by code
                stub.Embed(pb.EmbedRequest(inputs=["x"]), timeout=30)
            reply = requests.post(f"{server.url}/v1/embeddings",
                                  json={"input": ["search_query: hi"]}, timeout=60)
            assert reply.status_code == 200
            os.kill(server.worker_pid(0), signal.SIGKILL)
            wait_for(lambda: any(k.startswith("moe_embed_worker_restarts_total")
                                 for k in server.metrics()), 60, "the worker restart")
            wait_for(lambda: len(server.worker_pids()) == 3, 60, "the new worker")
            stub.Embed(pb.EmbedRequest(inputs=["after"], task=pb.TASK_NONE), timeout=60)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            yield Exported(response.read().decode())


GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends Prometheus: its interval variables become durations, the
    dashboard's own variables (used only inside =~ matchers) a match-all regex."""
    def value(match: re.Match[str]) -> str:
        return "1m" if match.group(1) in ("__rate_interval", "__interval", "__range") else ".*"
    return GRAFANA_VARIABLE.sub(value, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every label_values() template variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: not label_values(series, label): {query}"
        out.append((f"variable {variable['name']}", match.group(1)))
    return out


def check_query(exported: Exported, where: str, promql: str) -> set[str]:
    """Every selector's metric and labels exist, and every `by`/`on` label exists on some
    series under it; returns the metric names read."""
    expr = promql_parser.parse(grafana_to_promql(promql))
    names: set[str] = set()

    def selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
        found = []

        def visit(n: promql_parser.Expr) -> None:
            if isinstance(n, promql_parser.MatrixSelector):
                n = n.vector_selector
            if isinstance(n, promql_parser.VectorSelector):
                found.append(n)
        promql_parser.walk(node, visit)
        return found

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.MatrixSelector):
            node = node.vector_selector
        if isinstance(node, promql_parser.VectorSelector):
            names.add(exported.check_selector(node, where))
        grouping = getattr(getattr(node, "modifier", None), "labels", None) or []
        if isinstance(node, promql_parser.AggregateExpr | promql_parser.BinaryExpr) and grouping:
            available = set().union(*(exported.labels.get(s.name, set())
                                      for s in selectors(node)))
            for label in grouping:
                assert label in available | TARGET_LABELS, f"{where}: no series has {label!r}"

    promql_parser.walk(expr, visit)
    assert names, f"{where}: reads no metric: {promql}"
    return names


def test_every_dashboard_query_reads_exported_metrics(exported: Exported) -> None:
    read: set[str] = set()
    for where, promql in dashboard_queries():
        read |= check_query(exported, where, promql)
    missing = {name: what for name, what in REQUIRED.items() if name not in read}
    assert not missing, f"the dashboard shows no {missing}"
    heatmaps = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "heatmap"]
    assert heatmaps and all("moe_embed_expert_tokens_total" in t["expr"]
                            for p in heatmaps for t in p["targets"])
    # one heatmap per MoE layer: repeated over the layer label the counter carries
    assert {p.get("repeat") for p in heatmaps} == {"layer"}
    assert "layer" in exported.labels["moe_embed_expert_tokens_total"]


def test_adapter_rule_serves_the_queue_gauges_the_hpa_reads(exported: Exported) -> None:
    """The prometheus-adapter rule selects exactly the queue gauges (each one exported, each a
    gauge), the chart's default HPA metric among them, under the same name."""
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    series = promql_parser.parse(rule["seriesQuery"])
    assert isinstance(series, promql_parser.VectorSelector) and not series.name
    matchers = {m.name: m for m in series.matchers.matchers}
    names_regex = matchers.pop("__name__")
    assert names_regex.op == promql_parser.MatchOp.Re
    assert set(matchers) == {"namespace", "pod"}  # the resources the rule maps
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    selected = {n for n in exported.types if re.fullmatch(names_regex.value, n)}
    alternatives = re.fullmatch(r"moe_embed_\((.+)\)", names_regex.value).group(1).split("|")
    assert selected == {f"moe_embed_{a}" for a in alternatives}, "a name matches no metric"
    assert {exported.types[n] for n in selected} == {"gauge"}
    metric = default_values()["autoscaling"]["queueDepth"]["metricName"]
    assert metric in selected
    assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                  metric) == metric  # served under the name the HPA asks for
    for name in sorted(selected):
        query = (rule["metricsQuery"].replace("<<.Series>>", name)
                 .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{RELEASE}-.*"')
                 .replace("<<.GroupBy>>", "pod"))
        assert check_query(exported, f"adapter query for {name}", query) == {name}


def test_keda_default_query_reads_an_exported_gauge(exported: Exported, helm: Path) -> None:
    r = render(helm, {"autoscaling": {"enabled": True, "keda": {"enabled": True}}})
    (scaled,) = r.of_kind("ScaledObject")
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    (name,) = check_query(exported, "KEDA trigger", trigger["metadata"]["query"])
    assert exported.types[name] == "gauge"


@pytest.fixture(scope="module")
def helm() -> Path:
    from moe_embed.testing.helm_chart import MISSING_HELM, helm_path

    path = helm_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(MISSING_HELM.format(path=path), pytrace=False)
    return path
