"""Script, not a test: break the code one way at a time and check that the tests notice.

    .venv/bin/python benchmarks/mutations.py [--only NAME,...] [--list]

Each mutation replaces one snippet of the source (it must occur exactly once), runs the tests
that guard that behaviour, and expects them to FAIL; the file is restored afterwards, whatever
happens. A mutation the tests survive is a blind spot. Prints one line per mutation and a JSON
summary; exit status 1 if any mutation survived.

Only what the mutation tool (benchmarks/mutation/run.py, `make mutation`) cannot express is kept
here: files that are not Python (chart, dashboard, Dockerfile, Makefile, the Node client), edits
of several places at once, and modules whose guarding tests are end-to-end ones (servers,
worker processes) that are too slow to run once per generated mutant. The modules the tool
mutates against their own fast tests (its TARGETS) have no entry here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids
    more: tuple[tuple[str, str, str], ...] = ()  # further (file, old, new) edits

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.old, self.new), *self.more]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("tokenize whole texts (no bound)", "service/tokenizer.py",
             "        if len(text) <= self.window:\n",
             "        if True:\n",
             ("tests/service/test_service_hardening.py::test_oversized_inputs_cost_bounded_memory",
              "tests/service/test_tokenizer.py")),
    Mutation("long texts cut into fixed-size pieces (splits graphemes)",
             "service/tokenizer.py",
             "            end = _grapheme_cut(text, start + PIECE_CHARS)",
             "            end = min(len(text), start + PIECE_CHARS)",
             ("tests/service/test_tokenizer.py::"
              "test_bounded_tokenizing_keeps_the_ids_of_the_whole_text",)),
    Mutation("tokenize on the event loop", "service/engine.py",
             "INLINE_TOKENIZE_CHARS = 4096",
             "INLINE_TOKENIZE_CHARS = 10**9",
             ("tests/service/test_service_hardening.py::"
              "test_tokenizing_huge_inputs_does_not_block_other_calls",)),
    Mutation("stream window released when computed, not written", "service/server.py",
             "                window.release()  # written: the client has taken it\n",
             "                pass\n",
             ("tests/service/test_service_hardening.py::"
              "test_a_stream_that_is_never_read_stops_being_read",),
             more=(("service/server.py",
                    "            finally:\n                self.metrics.observe_request("
                    '"EmbedStream"',
                    "            finally:\n                window.release()\n"
                    '                self.metrics.observe_request("EmbedStream"'),)),
    Mutation("strict protobuf parsing", "service/server.py",
             "        except (DecodeError, ValueError, UnicodeDecodeError) as exc:\n"
             "            return Malformed(exc)",
             "        except ZeroDivisionError as exc:\n            return Malformed(exc)",
             ("tests/service/test_service_hardening.py::"
              "test_malformed_messages_are_invalid_argument_and_a_stream_goes_on",)),
    Mutation("cancelled stream requests counted OK", "service/server.py",
             '                code = "CANCELLED"\n                raise',
             "                raise",
             ("tests/service/test_service_hardening.py::"
              "test_cancelled_stream_requests_are_counted_as_cancelled",)),
    Mutation("health and admission ignore workers that cannot load",
             "service/worker_pool.py",
             "        return self.ready_count > 0 or any(n == 0 for n in self._early_deaths)",
             "        return True",
             ("tests/service/test_service_hardening.py::test_no_worker_can_load_then_one_can",)),
    Mutation("a hung worker is waited for", "service/scheduler.py",
             "        return self.batch_timeout_s + STUCK_FACTOR * expected",
             "        return None",
             ("tests/service/test_service_hardening.py::"
              "test_a_hung_worker_is_replaced_and_its_batch_resent",
              "tests/service/test_service_scheduler.py::"
              "test_stuck_worker_is_killed_and_its_batch_resent")),
    Mutation("oversized responses computed anyway", "service/engine.py",
             "        if size > self.config.max_message_bytes:",
             "        if False:",
             ("tests/service/test_service_hardening.py::"
              "test_a_response_over_the_message_limit_is_refused_before_any_work",)),
    Mutation("no per-connection stream limit", "service/server.py",
             '        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),\n',
             "",
             ("tests/service/test_service_hardening.py::"
              "test_concurrent_streams_per_connection_are_limited",)),
    Mutation("metrics on every path", "service/metrics.py",
             '            if environ.get("PATH_INFO") == "/metrics":',
             "            if True:",
             ("tests/service/test_service_hardening.py::test_metrics_answer_only_on_their_path",)),
    Mutation("tokenizer load error without its path", "service/tokenizer.py",
             'raise BundleError(f"{path}: cannot load the tokenizer: {exc}") from exc',
             'raise BundleError("cannot load the tokenizer") from exc',
             ("tests/service/test_service_hardening.py::test_corrupt_tokenizer_is_named",)),
    Mutation("drain does not wait for admitted work", "service/server.py",
             "            finished = await self.engine.wait_idle(grace_s)",
             "            finished = True",
             ("tests/service/test_service_resilience.py::test_sigterm_drains_without_losing_requests",)),
    Mutation("lame duck of a fixed half second", "service/server.py",
             "        await self._lame_duck(deadline)",
             "        await asyncio.sleep(LAME_DUCK_S)",
             ("tests/service/test_service_resilience.py::test_sigterm_drains_without_losing_requests",)),
    # the blind spots of the suite's audit
    Mutation("truncation keeps the tail, not the head", "service/tokenizer.py",
             "        return ids[: self.max_tokens - 1] + ids[-1:]  # keep </s>",
             "        return ids[:1] + ids[-(self.max_tokens - 1):]",
             ("tests/service/test_tokenizer.py",)),
    Mutation("rotary base x10 in the exporter and the reference alike",
             "export/onnx_graphs.py",
             "np.power(np.float32(cfg.rotary_emb_base), half)",
             "np.power(np.float32(cfg.rotary_emb_base * 10), half)",
             ("tests/workers/test_parity.py", "tests/export/test_llama_oracle.py"),
             more=(("export/reference.py",
                    "1.0 / (cfg.rotary_emb_base ** (torch.arange",
                    "1.0 / ((cfg.rotary_emb_base * 10) ** (torch.arange"),)),
    Mutation("rotate-half sign flipped in the exporter and the reference alike",
             "export/onnx_graphs.py",
             'rotated = g.op("Concat", g.op("Neg", hi), lo, axis=-1)',
             'rotated = g.op("Concat", hi, g.op("Neg", lo), axis=-1)',
             ("tests/workers/test_parity.py", "tests/export/test_llama_oracle.py"),
             more=(("export/reference.py",
                    "return torch.cat([-x[..., half:], x[..., :half]], dim=-1)",
                    "return torch.cat([x[..., half:], -x[..., :half]], dim=-1)"),)),
    Mutation("w2 read transposed by the exporter and the reference alike",
             "export/onnx_graphs.py",
             "    return (_np(tensors[p + \"w1\"]).reshape(e, f, h), "
             "_np(tensors[p + \"w2\"]).reshape(e, f, h))",
             "    return (_np(tensors[p + \"w1\"]).reshape(e, f, h), "
             "_np(tensors[p + \"w2\"]).reshape(e, h, f).transpose(0, 2, 1).copy())",
             ("tests/workers/test_parity.py", "tests/export/test_llama_oracle.py"),
             more=(("export/reference.py",
                    "        w2 = self.w2.view(self.num_experts, self.ffn, -1)",
                    "        w2 = self.w2.view(self.num_experts, -1, self.ffn).transpose(1, 2)"),)),
    Mutation("the scheduler's own deadline drop removed", "service/scheduler.py",
             "        for job in self.queue.expired(now):",
             "        for job in []:",
             ("tests/service/test_service_scheduler.py::"
              "test_a_request_past_its_deadline_is_dropped_before_any_worker",)),
    Mutation("first free worker instead of the least loaded", "service/worker_pool.py",
             "            if best is None or (w.slots, w.tokens) < (best.slots, best.tokens):",
             "            if best is None:",
             ("tests/service/test_service_scheduler.py::test_the_least_loaded_worker_gets_the_next_batch",)),
    Mutation("the frontend's dimensions check removed", "service/validation.py",
             "            or not lo <= dimensions <= hi:",
             "            or False:",
             ("tests/service/test_service_e2e.py::"
              "test_bad_input_is_invalid_argument_naming_field_and_index",)),
    Mutation("worker runs batches in arrival order", "workers/process/main.py",
             "        task = next_to_step(running)",
             "        task = running[0]",
             ("tests/service/test_service_scheduler.py::test_a_small_batch_overtakes_a_large_one",)),
    Mutation("worker runs the smallest batch first (starves older ones)",
             "workers/process/main.py",
             "        task = next_to_step(running)",
             "        task = min(running, key=lambda r: r.tokens)",
             ("tests/service/test_service_scheduler.py::test_batches_of_similar_size_keep_their_order",
              "tests/service/test_service_scheduler.py::"
              "test_the_worker_lets_only_far_smaller_batches_ahead_and_only_so_much")),
    Mutation("a batch lets through any number of smaller ones", "workers/process/main.py",
             "             and (r.overtook or oldest.yielded + r.tokens <= oldest.tokens)]",
             "             ]",
             ("tests/service/test_service_scheduler.py::test_a_large_batch_yields_at_most_its_own_size",
              "tests/service/test_service_scheduler.py::"
              "test_the_worker_lets_only_far_smaller_batches_ahead_and_only_so_much")),
    Mutation("express batches as large as any", "service/scheduler.py",
             "            elif express:\n                budget = EXPRESS_TOKENS\n",
             "            elif express:\n                budget = None\n",
             ("tests/service/test_service_scheduler.py::test_a_small_batch_overtakes_a_large_one",
              "tests/service/test_service_scheduler.py::test_a_large_batch_yields_at_most_its_own_size")),
    Mutation("express batches for every caller (a burst is cut into small batches)",
             "service/scheduler.py",
             "                if self._in_flight[c] + self.queue.tokens_waiting(c) <= "
             "EXPRESS_TOKENS}",
             "                }",
             ("tests/service/test_service_scheduler.py::"
              "test_a_burst_from_one_caller_is_sent_ahead_whole",)),
    Mutation("an idle worker takes light and heavy callers' inputs in one batch",
             "service/scheduler.py",
             "            express = bool(light) and (worker.busy or len(light) < len(",
             "            express = bool(light) and (worker.busy or 0 * len(",
             ("tests/service/test_service_scheduler.py::"
              "test_a_light_request_never_rides_in_a_heavy_callers_batch",)),
    Mutation("express batches take heavy callers' inputs too", "service/scheduler.py",
             "                                    only=light if express else None)",
             "                                    only=None)",
             ("tests/service/test_service_scheduler.py::"
              "test_a_light_request_never_rides_in_a_heavy_callers_batch",)),
    Mutation("a busy worker is sent everything that waits", "service/scheduler.py",
             "    return 1 if workers <= 1 else 2 * workers",
             "    return 1",
             ("tests/service/test_service_scheduler.py::test_a_burst_is_shared_between_busy_workers",)),
    Mutation("no express slot (a light caller waits for a heavy batch's slot)",
             "service/worker_pool.py",
             "EXPRESS_SLOTS = 1",
             "EXPRESS_SLOTS = 0",
             ("tests/service/test_service_hardening.py::"
              "test_a_light_caller_is_not_starved_by_a_flooding_stream",)),
    Mutation("graphs saved with their weights inline (copied at every start)", "export/split.py",
             "EXTERNAL_MIN = 1024 ", "EXTERNAL_MIN = 1 << 40 ",
             ("tests/export/test_bundle.py::"
              "test_the_runtime_maps_the_weights_from_the_bundle_instead_of_copying_them",)),
    Mutation("external weights at unaligned offsets (ORT copies them)", "export/split.py",
             "PAGE = 4096 ", "PAGE = 1 ",
             ("tests/export/test_bundle.py::"
              "test_weights_are_saved_page_aligned_and_read_back_exactly",)),
    Mutation("one-thread workers load their own weights (no loader)", "service/worker_pool.py",
             "        self.forked = share_weights and threads == 1",
             "        self.forked = False",
             ("tests/service/test_service_resilience.py::"
              "test_one_thread_workers_share_the_loaders_weights",)),
    Mutation("the loader forks with ONNX Runtime's telemetry thread running",
             "service/worker_pool.py",
             "                env={**os.environ, **LOADER_ENV})",
             "                env={k: v for k, v in os.environ.items()\n"
             "                     if k != 'ORT_DISABLE_TELEMETRY'})",
             ("tests/service/test_service_resilience.py::"
              "test_one_thread_workers_share_the_loaders_weights",)),
    Mutation("Unigram ties replace the first path found", "service/unigram.py",
             "                if start[j] < 0 or candidate > score[j]:\n"
             "                    score[j], start[j], token[j] = candidate, i, ids[k]",
             "                if start[j] < 0 or candidate >= score[j]:\n"
             "                    score[j], start[j], token[j] = candidate, i, ids[k]",
             ("tests/service/test_compact_tokenizer.py::test_ties_break_as_hfs_do",)),
    Mutation("unknown runs not fused", "service/unigram.py",
             "            if token[end] < 0 or token[end] == self.unk_id:",
             "            if False:",
             ("tests/service/test_compact_tokenizer.py",)),
    Mutation("the unknown-id piece not fused with unknown runs", "service/unigram.py",
             "            if token[end] < 0 or token[end] == self.unk_id:",
             "            if token[end] < 0:",
             ("tests/service/test_compact_tokenizer.py",)),
    Mutation("a repeated piece takes its first id", "service/unigram.py",
             "        np.maximum.at(ids, key_of, np.arange(len(pieces), dtype=np.int32))",
             "        np.minimum.at(ids, key_of, np.arange(len(pieces), dtype=np.int32))",
             ("tests/service/test_compact_tokenizer.py::test_a_repeated_piece_takes_its_last_id_and_score",),
             more=(("service/unigram.py",
                    "        ids = np.full(len(self._trie), -1, np.int32)",
                    "        ids = np.full(len(self._trie), 2**30, np.int32)"),)),
    Mutation("no unknown candidate where a one-character piece is missing",
             "service/unigram.py",
             "                single = single or j == i + 1",
             "                single = True",
             ("tests/service/test_compact_tokenizer.py",)),
    Mutation("a word that spells an added token is taken for it",
             "service/compact_tokenizer.py",
             "        word.prepend(MARK)\n", "",
             ("tests/service/test_compact_tokenizer.py::test_a_word_that_normalizes_into_an_added_token_is_still_segmented",)),
    Mutation("segmented words recorded for all threads at once",
             "service/compact_tokenizer.py",
             "        self.local = threading.local()",
             "        self.local = type('Shared', (), {})()",
             ("tests/service/test_compact_tokenizer.py::test_encoding_from_many_threads_at_once",)),
    Mutation("large requests tokenized on a pool of threads", "service/engine.py",
             "        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, "
             "fn, *args)",
             "        return await asyncio.to_thread(fn, *args)",
             ("tests/service/test_service_hardening.py::"
              "test_large_requests_are_tokenized_on_one_thread",)),
    # deploying and operating: the chart, the image, the dashboard, the clients
    Mutation("bundles kept out of the image's build context", ".dockerignore",
             "bundles/*.partial*", "bundles",
             ("tests/helm/test_helm_chart.py::"
              "test_bundled_target_bakes_in_the_bundle_that_model_source_image_serves",)),
    Mutation("the bundled image's bundle elsewhere than the chart looks", "Dockerfile",
             "ENV MOE_EMBED_BUNDLE=/models/bundle", "ENV MOE_EMBED_BUNDLE=/models/bundle/",
             ("tests/helm/test_helm_chart.py::"
              "test_bundled_target_bakes_in_the_bundle_that_model_source_image_serves",)),
    Mutation("image source mounts a model volume it does not have",
             "helm/templates/deployment.yaml",
             '{{- if has $src (list "hub" "existingClaim") }}', '{{- if ne $src "demo" }}',
             ("tests/helm/test_helm_chart.py::"
              "test_model_provisioning",)),
    Mutation("KEDA compares the release's total, not the per-pod average",
             "helm/templates/scaledobject.yaml",
             "metricType: AverageValue", "metricType: Value",
             ("tests/helm/test_helm_chart.py::"
              "test_scaledobject_scales_the_deployment_on_the_queue",)),
    Mutation("KEDA's default query selects a label the ServiceMonitor does not set",
             "helm/templates/scaledobject.yaml", "job=%q", "service=%q",
             ("tests/helm/test_helm_chart.py::"
              "test_scaledobject_scales_the_deployment_on_the_queue",)),
    Mutation("a ScaledObject field its CRD does not know", "helm/templates/scaledobject.yaml",
             "  pollingInterval:", "  pollInterval:",
             ("tests/helm/test_helm_chart.py::"
              "test_scaledobject_scales_the_deployment_on_the_queue",)),
    Mutation("HPA on CPU even when its target is 0", "helm/templates/hpa.yaml",
             "gt (int $a.targetCPUUtilizationPercentage) 0", "true",
             ("tests/helm/test_helm_chart.py::"
              "test_replicas_or_autoscaler",)),
    Mutation("int8 preset's limit below the measured load", "helm/templates/_helpers.tpl",
             'int8:\n  requests: {cpu: "2", memory: 768Mi}\n  limits: {cpu: "2", memory: 2Gi}',
             'int8:\n  requests: {cpu: "2", memory: 768Mi}\n  limits: {cpu: "2", memory: 1Gi}',
             ("tests/helm/test_helm_chart.py::"
              "test_resource_presets_cover_the_measured_footprint",)),
    Mutation("dashboard ConfigMap without the repo's JSON", "helm/templates/dashboard.yaml",
             '"dashboards/moe-embed.json"', '"dashboards/moe-embed.jsn"',
             ("tests/helm/test_helm_chart.py::"
              "test_dashboard_configmap_ships_the_repo_file",)),
    Mutation("tracing sampler misspelt (the SDK falls back to its default)",
             "helm/templates/deployment.yaml",
             "value: parentbased_traceidratio", "value: parentbased_traceid_ratio",
             ("tests/helm/test_helm_chart.py::"
              "test_tracing_values_reach_the_server_and_the_otel_sdk",)),
    Mutation("a dashboard panel reads a metric the server does not export",
             "helm/dashboards/moe-embed.json",
             "sum(moe_embed_queue_tokens{", "sum(moe_embed_queue_token{",
             ("tests/helm/test_dashboard_metrics.py::"
              "test_every_dashboard_query_reads_exported_metrics",)),
    Mutation("the dashboard shows no truncated inputs", "helm/dashboards/moe-embed.json",
             "sum(rate(moe_embed_truncated_inputs_total{",
             "sum(rate(moe_embed_inputs_dropped_total{",
             ("tests/helm/test_dashboard_metrics.py::"
              "test_every_dashboard_query_reads_exported_metrics",)),
    Mutation("the adapter rule names a gauge that does not exist",
             "helm/examples/prometheus-adapter.yaml",
             "queue_oldest_wait_seconds|", "queue_oldest_wait|",
             ("tests/helm/test_dashboard_metrics.py::"
              "test_adapter_rule_serves_the_queue_gauges_the_hpa_reads",)),
    Mutation("the adapter serves the gauges under other names than the HPA asks for",
             "helm/examples/prometheus-adapter.yaml",
             'as: "${1}"', 'as: "${1}_per_pod"',
             ("tests/helm/test_dashboard_metrics.py::"
              "test_adapter_rule_serves_the_queue_gauges_the_hpa_reads",)),
    Mutation("torch from a CUDA index", "Makefile",
             "TORCH_INDEX ?= https://download.pytorch.org/whl/cpu",
             "TORCH_INDEX ?= https://download.pytorch.org/whl/cu128",
             ("tests/helm/test_makefile.py",)),
    Mutation("Node client's field names camelCased", "tests/node/embed_client.js",
             "keepCase: true", "keepCase: false",
             ("tests/service/test_node_client.py",)),
    # hardening, round two (issue 22)
    Mutation("no header deadline on a new HTTP connection", "service/http/connections.py",
             '        self._arm("headers", limits.header_timeout_s)\n',
             "        pass\n",
             ("tests/service/test_hardening_connections.py::test_a_connection_without_its_headers_is_closed",)),
    Mutation("half a header after a response holds the connection", "service/http/connections.py",
             '        elif self._phase == "idle":',
             "        elif False:",
             ("tests/service/test_hardening_connections.py::test_bytes_after_a_response_restart_the_header_deadline",)),
    Mutation("no body deadline", "service/http/connections.py",
             '                    self._arm("body", self.limits.body_timeout_s)',
             "                    pass",
             ("tests/service/test_hardening_connections.py::test_a_body_that_stops_halfway_gets_408_and_counts_as_cancelled",)),
    Mutation("no bound on HTTP connections", "service/http/connections.py",
             "        if len(self.connections) >= limits.max_connections:",
             "        if False:",
             ("tests/service/test_hardening_connections.py::test_a_port_holds_at_most_its_connections_and_refuses_the_rest",)),
    Mutation("metrics on a thread per connection", "service/server.py",
             "        sock = bind(cfg.metrics_host or cfg.host, cfg.metrics_port)\n",
             "        from prometheus_client import start_http_server\n"
             "        start_http_server(cfg.metrics_port, cfg.metrics_host or cfg.host, "
             "self.metrics.registry)\n"
             "        self.metrics_port = cfg.metrics_port\n"
             "        return\n",
             ("tests/service/test_hardening_connections.py::test_idle_metrics_connections_cost_no_threads",)),
    Mutation("accept retries logged every time", "service/logging.py",
             "THROTTLE_S = 10.0", "THROTTLE_S = 0.0",
             ("tests/service/test_hardening_connections.py::test_running_out_of_descriptors_costs_one_json_line",)),
    Mutation("a hang-up mid-body is INTERNAL", "service/http/app.py",
             "    except ClientDisconnect:  # hung up, or closed for a late body",
             "    except ZeroDivisionError:  # hung up, or closed for a late body",
             ("tests/service/test_hardening_accounting.py::test_a_client_that_hangs_up_mid_body_is_cancelled_not_internal",)),
    Mutation("a request cut by the drain is uvicorn's 500", "service/http/app.py",
             "            current = asyncio.current_task()\n",
             "            raise\n            current = asyncio.current_task()\n",
             ("tests/service/test_hardening_accounting.py::test_a_request_cut_by_the_drain_gets_503_not_500",)),
    Mutation("an oversized Tokenize response left to gRPC", "service/grpc_api.py",
             "        if size > limit:", "        if False:",
             ("tests/service/test_hardening_accounting.py::test_an_oversized_tokenize_response_is_resource_exhausted",)),
    Mutation("a connection at its stream limit not counted", "service/grpc_api.py",
             "        if n == limit:", "        if False:",
             ("tests/service/test_hardening_accounting.py::test_a_connection_at_its_stream_limit_is_counted",)),
    Mutation("gRPC core writes plain text to stderr", "service/serve_command.py",
             "    json_stderr()  # gRPC core's own lines become JSON too\n", "",
             ("tests/service/test_hardening_accounting.py::test_grpc_core_lines_are_json",)),
    Mutation("token-id bodies parsed whatever they hold", "service/http/app.py",
             "            counter.feed(chunk)\n", "",
             ("tests/service/test_hardening_token_ids.py::test_a_token_id_flood_is_refused_before_the_body_is_read_whole",
              "tests/service/test_hardening_token_ids.py::test_token_ids_up_to_the_bound_are_served_and_one_past_is_refused")),
    Mutation("strings unbounded in a body", "service/http/app.py",
             "        self.max_strings = max_inputs + FIELD_ALLOWANCE",
             "        self.max_strings = 10**9",
             ("tests/service/test_hardening_token_ids.py::test_more_strings_than_inputs_allow_is_refused_naming_input",)),
    Mutation("escaped quotes taken for string ends", "service/http/json_scan.py",
             '.replace(b\'\\\\"\', b"")', "",
             ("tests/service/test_hardening_token_ids.py::test_the_counter_agrees_with_a_character_walk_however_the_body_is_split",)),
    Mutation("a NaN among token ids taken for an input", "service/http/schema.py",
             "all(type(v) in (int, float) for v in value)", "all(type(v) is int for v in value)",
             ("tests/service/test_hardening_doubtful.py::test_a_non_integer_among_token_ids_names_that_input",)),
    Mutation("a body framed twice accepted", "service/http/app.py",
             '    if declared is not None and "transfer-encoding" in request.headers:',
             "    if False:",
             ("tests/service/test_hardening_doubtful.py::test_a_body_framed_twice_is_refused_and_the_connection_closed",)),
    Mutation("HEAD refused on the probes", "service/http/app.py",
             '    @app.head("/health", include_in_schema=False)  # probes that send HEAD\n',
             "",
             ("tests/service/test_hardening_doubtful.py::test_head_answers_on_the_probe_routes",)),
)


def run(m: Mutation, timeout_s: float) -> dict:
    originals = {f: (REPO / f).read_text() for f, _, _ in m.edits()}
    mutated = dict(originals)
    for f, old, new in m.edits():
        if mutated[f].count(old) != 1:
            return {"mutation": m.name, "result": f"STALE ({f}: snippet not found exactly once)"}
        mutated[f] = mutated[f].replace(old, new)
    start = time.monotonic()
    try:
        for f, text in mutated.items():
            (REPO / f).write_text(text)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *m.tests], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
        caught = proc.returncode == 1
        tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    except subprocess.TimeoutExpired:
        caught, tail = True, [f"timed out after {timeout_s:.0f}s (counts as caught)"]
    finally:
        for f, text in originals.items():
            (REPO / f).write_text(text)
    return {"mutation": m.name, "result": "caught" if caught else "SURVIVED",
            "tests": list(m.tests), "seconds": round(time.monotonic() - start, 1),
            "pytest": tail[0] if tail else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma list of substrings of mutation names")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS
              if not args.only or any(k.strip() in m.name for k in args.only.split(","))]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}]")
        return 0
    results = []
    for m in chosen:
        r = run(m, args.timeout)
        results.append(r)
        print(f"{r['result']:>8}  {m.name}  ({r.get('seconds', 0)} s) {r.get('pytest', '')}",
              flush=True)
    survived = [r for r in results if r["result"] != "caught"]
    print(json.dumps({"mutations": len(results), "caught": len(results) - len(survived),
                      "survived": [r["mutation"] for r in survived]}))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
