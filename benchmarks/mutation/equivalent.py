"""Survivors of the mutation run (run.py) that no behaviour can observe, each with its reason.

module -> [(the line as the mutant removes it, the line it puts instead, why it is equivalent)],
lines stripped of their indentation. run.py matches every survivor's diff against these; one
that matches none is reported NOT EXPLAINED: it needs a test that kills it, or a reason here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# a binary operator put in place of another (cosmic-ray's ReplaceBinaryOperator)
_BINARY = re.compile(r"\s*(\*\*|//|>>|<<|[|/+\-*&%^])\s*")


def _in_annotation(module: str, old: str, new: str) -> bool:
    """The `|` of a type annotation (`int | None`) replaced by another operator, in a module
    that imports annotations from __future__: annotations are strings, never evaluated."""
    if "from __future__ import annotations" not in (REPO / module).read_text():
        return False
    typed = re.fullmatch(r"(def \w+\(.*|[\w.]+: .*|.*\) -> .*:)", old)
    return bool(typed) and " | " in old and _BINARY.sub("|", old) == _BINARY.sub("|", new)


def _negative_reshape(module: str, old: str, new: str) -> bool:
    """reshape(-1) -> reshape(- 2) or reshape(~1): numpy takes any negative size as the one
    unknown dimension."""
    return "reshape(-1)" in old and any(
        old.replace("reshape(-1)", f"reshape({r})") == new for r in ("- 2", "~1"))


# Survivors of any module, by the shape of their change: (rule, why)
ANY_MODULE: list[tuple[Callable[[str, str, str], bool], str]] = [
    (_in_annotation, "a type annotation: this module imports annotations from __future__, so "
                     "they are strings that nothing evaluates"),
    (_negative_reshape, "numpy takes any negative size as the one unknown dimension: -2 "
                        "flattens like -1"),
]

_FRACTION = ("a dead line: the loop over _REQUIRED_VALUES above already refuses every "
             "rotary_emb_fraction but 1.0, so this test never sees 0 (or any value it could "
             "tell apart)")
_PAD_DEFAULT = ("the default of d.get is never used: this branch runs only when "
                "'pad_token_id' is in d and not None")

_CHUNK = ("the read size: reads of any positive size, or one read of everything (a "
          "negative size), hash the same bytes")

_IDENTITY = "Job defines no __eq__: == and != compare identity, as is and is not do"

_ROWS_2D = "the array is always 2-D ([rows, width]), so axis 1 is its last axis"
_NORM = "pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)"
_NUM_EXPERTS = ("num_experts only pads bincount's counts (minlength): bincount grows to the "
                "largest expert id anyway, and experts with no token are skipped either way")

EQUIVALENT: dict[str, list[tuple[str, str, str]]] = {
    "workers/runtime/pooling.py": [
        (_NORM, _NORM.replace("axis=-1", "axis=1"), _ROWS_2D),
        (_NORM, _NORM.replace("axis=-1", "axis=+1"), _ROWS_2D),
        ("for row, vec in zip(rows, finish(pooled[rows], key[0], bool(key[1])), strict=True):",
         "for row, vec in zip(rows, finish(pooled[rows], key[0], bool(key[1])), strict=False):",
         "finish returns one row per row given, so the two always have the same length"),
        ("if dimensions < pooled.shape[1]:", "if dimensions != pooled.shape[1]:",
         "dimensions never exceed the width (the frontend checks them against the bundle's "
         "range), and at or below it != and < agree"),
    ],
    "workers/runtime/router.py": [
        ("probs = logits.softmax(dim=-1, dtype=torch.float32)",
         "probs = logits.softmax(dim=+1, dtype=torch.float32)", _ROWS_2D),
        ("probs = logits.softmax(dim=-1, dtype=torch.float32)",
         "probs = logits.softmax(dim=1, dtype=torch.float32)", _ROWS_2D),
        ("top_w, top_e = torch.topk(probs, self.top_k, dim=-1)",
         "top_w, top_e = torch.topk(probs, self.top_k, dim=+1)", _ROWS_2D),
        ("top_w, top_e = torch.topk(probs, self.top_k, dim=-1)",
         "top_w, top_e = torch.topk(probs, self.top_k, dim=1)", _ROWS_2D),
        ("self.num_experts = weight.shape[0]", "self.num_experts = weight.shape[ 1]",
         _NUM_EXPERTS),
        ("self.num_experts = weight.shape[0]", "self.num_experts = weight.shape[ -1]",
         _NUM_EXPERTS),
    ],
    "workers/runtime/chunks.py": [
        ("return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]",
         "return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=False)]",
         "bounds[:-1] and bounds[1:] of one list always have the same length"),
        ("while start < len(lengths):", "while start != len(lengths):",
         "start only grows to end, which stops at len(lengths): it never passes it"),
        ("while end < len(lengths):", "while end != len(lengths):",
         "end grows by one from start + 1 <= len(lengths): it never passes it"),
    ],
    "workers/process/policy.py": [
        ("return MAX_IN_FLIGHT + (EXPRESS_SLOTS if heavy else 0)",
         "return MAX_IN_FLIGHT | (EXPRESS_SLOTS if heavy else 0)",
         "MAX_IN_FLIGHT (2) and EXPRESS_SLOTS (1) share no bit: | adds them (the defaults are "
         "pinned by test_the_documented_defaults)"),
        ("return MAX_IN_FLIGHT + (EXPRESS_SLOTS if heavy else 0)",
         "return MAX_IN_FLIGHT ^ (EXPRESS_SLOTS if heavy else 0)",
         "MAX_IN_FLIGHT (2) and EXPRESS_SLOTS (1) share no bit: ^ adds them (the defaults are "
         "pinned by test_the_documented_defaults)"),
        ("small = [r for r in held[1:] if r.tokens * OVERTAKE_RATIO <= oldest.tokens",
         "small = [r for r in held[ 0:] if r.tokens * OVERTAKE_RATIO <= oldest.tokens",
         "the oldest is never 1/OVERTAKE_RATIO of itself: t * 4 <= t only for t = 0, and every "
         "batch holds tokens (each input has at least <s> and </s>)"),
        ("return bool(light) and (len(light) < callers_waiting or (worker_busy and "
         "heavy_in_flight))",
         "return bool(light) and (len(light) != callers_waiting or (worker_busy and "
         "heavy_in_flight))",
         "the light callers are among the callers waiting, so len(light) is never more: != "
         "and < agree"),
    ],
    "workers/bundle/recipes.py": [
        ("ROWWISE_AUX_BYTES = 1 + 4 + 4 + 4 + 8", "ROWWISE_AUX_BYTES = 1 | 4 + 4 + 4 + 8",
         "1 | 20 = 21: the same constant"),
        ("ROWWISE_AUX_BYTES = 1 + 4 + 4 + 4 + 8", "ROWWISE_AUX_BYTES = 1 ^ 4 + 4 + 4 + 8",
         "1 ^ 20 = 21: the same constant"),
        ("ROWWISE_AUX_BYTES = 1 + 4 + 4 + 4 + 8", "ROWWISE_AUX_BYTES = 1 + 4 ^ 4 + 4 + 8",
         "(1 + 4) ^ (4 + 4 + 8) = 5 ^ 16 = 21: the same constant"),
        ("ROWWISE_AUX_BYTES = 1 + 4 + 4 + 4 + 8", "ROWWISE_AUX_BYTES = 1 + 4 | 4 + 4 + 8",
         "(1 + 4) | (4 + 4 + 8) = 5 | 16 = 21: the same constant"),
        ("if block < 16 or block > 256 or block & (block - 1):",
         "if block < 16 or block > 257 or block & (block - 1):",
         "257 is no power of two: the same line's next test refuses it"),
        ("if block < 16 or block > 256 or block & (block - 1):",
         "if block < 15 or block > 256 or block & (block - 1):",
         "15 is no power of two: the same line's next test refuses it"),
        ("if block < 16 or block > 256 or block & (block - 1):",
         "if block < 16 or block > 256 or block & (block - 2):",
         "in 16..256, b & (b - 2) is 0 only at powers of two too: b - 2 keeps b's top bit "
         "unless b is 2^h or 2^h + 1, and an odd b shares bit 0 with b - 2"),
        ('return all(f == "fp32" for f in (*self.formats.values(), *self.overrides.values()))',
         'return all(f <= "fp32" for f in (*self.formats.values(), *self.overrides.values()))',
         "validate() admits no format that sorts before 'fp32' (int8-*, nbits* sort after): "
         "<= is == on every recipe that passed it"),
    ],
    "workers/bundle/config.py": [
        *[('if d.get("rotary_emb_fraction", 1.0) == 0:', new, _FRACTION) for new in (
            'if d.get("rotary_emb_fraction", 2.0) == 0:',
            'if d.get("rotary_emb_fraction", 1.0) == -1:',
            'if d.get("rotary_emb_fraction", 1.0) <= 0:',
            'if d.get("rotary_emb_fraction", 1.0) < 0:')],
        *[('pad_token_id=int(d.get("pad_token_id", 1) if d.get("pad_token_id") is not None '
           'else 1),', f'pad_token_id=int(d.get("pad_token_id", {v}) if d.get("pad_token_id") '
           'is not None else 1),', _PAD_DEFAULT) for v in (0, 2)],
        ("if n_embd % n_head or (n_embd // n_head) % 2:",
         "if n_embd % n_head or (n_embd / n_head) % 2:",
         "only reached when n_head divides n_embd: the quotient is exact either way"),
    ],
    "workers/bundle/format.py": [
        *[("def sha256_file(path: Path, chunk: int = 1 << 22) -> str:",
           f"def sha256_file(path: Path, chunk: int = {v}) -> str:", _CHUNK)
          for v in ("1 << 21", "1 << 23", "1 ** 22", "1 % 22", "1 ^ 22", "1 | 22", "1 * 22",
                    "1 + 22", "1 - 22", "2 << 22")],
        *[("files = sorted(self.manifest.files.items(), key=lambda kv: -kv[1].bytes)",
           f"files = sorted(self.manifest.files.items(), key=lambda kv: {v}kv[1].bytes)",
           "the order is for speed (the largest file's hash starts first): every file is "
           "checked either way; only with several bad files does another one get named first")
          for v in ("", "~", "+", "not ")],
        *[("with ThreadPoolExecutor(max(1, workers)) as pool:",
           f"with ThreadPoolExecutor(max( {v}, workers)) as pool:",
           "workers is already >= 1 (threads, or this process's cores): only how many threads "
           "hash changes, not the digests") for v in (0, 2)],
        ('if d.get("format_version") != FORMAT_VERSION:',
         'if d.get("format_version") is not FORMAT_VERSION:',
         "CPython shares the int objects -5..256: a format_version of 2 read from JSON is the "
         "very object FORMAT_VERSION is, and anything else is not equal either"),
        ("if p.stat().st_size != entry.bytes:", "if p.stat().st_size > entry.bytes:",
         "a shrunk file is refused by the hash check just below, with the same message: the "
         "size check only spares hashing a file of the wrong size"),
        ("workers = threads or len(os.sched_getaffinity(0))",
         "workers = threads or len(os.sched_getaffinity( 1))",
         "how many threads hash (pid 1's cores instead of ours): the digests are the same"),
        ("for (rel, entry), digest in zip(files, digests, strict=True):",
         "for (rel, entry), digest in zip(files, digests, strict=False):",
         "pool.map gives one digest per file: the two always have the same length"),
        ("if p.stat().st_size != entry.bytes:", "if p.stat().st_size < entry.bytes:",
         "a grown file is refused by the hash check just below, with the same message: the "
         "size check only spares hashing a file of the wrong size"),
        *[('path.write_text(json.dumps(body, indent=2) + "\\n")',
           f'path.write_text(json.dumps(body, indent= {v}) + "\\n")',
           "the manifest's layout: its readers parse it, and its digest is of the bytes "
           "written, whatever the indent") for v in (1, 3)],
        ('if m.recipe is None and m.precision != "fp32":',
         'if m.recipe is None and m.precision > "fp32":',
         "precision is one of PRECISIONS here (checked just above), and int8 and int4 sort "
         "after fp32: > is != on every precision that reaches it"),
    ],
    "service/model_info.py": [
        ('return any(name in (n, n.rsplit("/", 1)[-1]) for n in self.names)',
         'return any(name in (n, n.rsplit("/", 2)[-1]) for n in self.names)',
         "the last part of a split from the right is the same whatever the most splits"),
    ],
    "workers/process/protocol.py": [
        *[(f"{kind} = {old}", f"{kind} = {new}",
           "the kind byte's value: both ends of the pipe encode and decode with this one enum, "
           "and the new value is still distinct from every other kind")
          for kind, old, new in (("BATCH", 1, 0), ("FORK", 3, 4), ("READY", 10, 9),
                                 ("LOAD_FAILED", 13, 14))],
        ("return [self.values[s:e] for s, e in zip(starts, ends, strict=True)]",
         "return [self.values[s:e] for s, e in zip(starts, ends, strict=False)]",
         "starts is cut to len(ends): the two always have the same length"),
        ("return cls(batch_id, compute_ms, widths, values.astype(np.float32, copy=False),",
         "return cls(batch_id, compute_ms, widths, values.astype(np.float32, copy=True),",
         "a copy of the same float32 values: copy=False only spares it"),
        ("layers, experts = counts.shape if counts.ndim == 2 else (0, 0)",
         "layers, experts = counts.shape if counts.ndim >= 2 else (0, 0)",
         "expert counts are [layers, experts] or empty, never of more dimensions (the runtime "
         "makes them 2-D; an empty 1-D array is tested)"),
    ],
    "service/batching.py": [
        ("kept = deque(it for it in items if it.job is not job)",
         "kept = deque(it for it in items if it.job != job)", _IDENTITY),
        ("tokens = sum(it.length for it in items if it.job is job)",
         "tokens = sum(it.length for it in items if it.job == job)", _IDENTITY),
        ("while self._deadlines and (self._deadlines[0][2].queued == 0",
         "while self._deadlines and (self._deadlines[0][2].queued <= 0",
         "a job's queued count never goes below 0 (set at admit, one less per input taken)"),
        ("if len(items) == len(self.items):", "if len(items) >= len(self.items):",
         "items is a subset of self.items: it is never longer"),
        *[("self.admitted_ns = 0  # wall clock of `admitted`, when tracing is on",
           f"self.admitted_ns = {v}  # wall clock of `admitted`, when tracing is on",
           "read only when tracing is on, and then set at admission with the span")
          for v in (-1, 1)],
        *[("dropped, job.queued = job.queued, 0", f"dropped, job.queued = job.queued, {v}",
           "after a cancel nothing reads queued: the job is done (its deadline entry goes by "
           "`done`), its inputs left the queue, and a second cancel stops at `if "
           "job.cancelled`") for v in (1, -1)],
        ("if self._tokenizing[caller] <= 0:", "if self._tokenizing[caller] == 0:",
         "room is released as it was reserved: a caller's count comes down to 0, never past"),
        ("if self.remaining == 0:", "if self.remaining <= 0:",
         "remaining never goes below 0: a vector already delivered is ignored before it"),
        *[("self._ids = itertools.count(1)", f"self._ids = itertools.count( {v})",
           "batch ids are only keys (a worker's in-flight map, logs): unique from any start")
          for v in (0, 2)],
    ],
    "workers/runtime/sessions.py": [
        *[("for p in sorted(paths, key=lambda p: -Path(p).stat().st_size)}",
           f"for p in sorted(paths, key=lambda p: {v}Path(p).stat().st_size)}}",
           "the order sessions are created in (largest first, for speed): they come back in "
           "the order asked whatever it is (tested)") for v in ("", "~", "+", "not ")],
        *[("ort.set_global_thread_pool_sizes(threads, 1)",
           f"ort.set_global_thread_pool_sizes(threads, {v})",
           "the inter-op pool: sessions run ORT_SEQUENTIAL (tested), which never uses it")
          for v in (0, 2)],
        *[('cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,',
           f'cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, {v},',
           "ORT's CPU memory info is device 0 whatever id it is given (its device_id reads 0 "
           "for 1 and -1 alike)") for v in (1, -1)],
        ("return max(1, len(os.sched_getaffinity(0)))",
         "return max( 0, len(os.sched_getaffinity(0)))",
         "a running process has at least one usable core: the max is never taken at 0"),
    ],
    "service/security.py": [
        ("if current is not None and current is not sslobj.context:",
         "if current is not None and current != sslobj.context:",
         "ssl.SSLContext defines no __eq__: != compares identity, as is not does"),
        *[(old, new, "the refusing handler aborts before it reads or writes a message: a "
                     "handler of another streaming kind answers the same UNAUTHENTICATED "
                     "(every kind of call is tested)") for old, new in (
            ("if handler.request_streaming and handler.response_streaming:",
             "if handler.request_streaming or handler.response_streaming:"),
            ("if handler.request_streaming and handler.response_streaming:",
             "if not handler.request_streaming and handler.response_streaming:"),
            ("if handler.response_streaming:", "if not handler.response_streaming:"),
            ("if handler.request_streaming:", "if not handler.request_streaming:"))],
        ("if current is not None and current is not sslobj.context:",
         "if current is not None or current is not sslobj.context:",
         "current is never None once a handshake can call this (http_ssl_context asserts the "
         "context exists), and setting the handshake's context to the one it has changes "
         "nothing"),
    ],
}

# module -> [(a line cosmic-ray takes out (a decorator), why that is equivalent)]
REMOVED: dict[str, list[tuple[str, str]]] = {
    "service/model_info.py": [
        ("@functools.cache", "the cache only spares looking the installed version up again: "
                             "every call gives the same string"),
    ],
}
