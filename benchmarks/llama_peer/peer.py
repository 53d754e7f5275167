"""llama.cpp as an embedding peer: token ids in, mean-pooled L2-normalized vectors out.

    peer = LlamaPeer(gguf_path, threads=2)
    vecs = peer.embed([[0, 33600, 31, 2], ...])    # float32 [B, H]
    peer.run(ids)                                  # the same work, for timing (returns None)

    .venv/bin/python benchmarks/llama_peer/peer.py --check     # F32 GGUF vs the fp32 reference

It feeds token ids, not text, so llama.cpp and the runtime see identical inputs (`<s> ... </s>`
from moe_embed's tokenizer). API: llama.cpp's C API through llama-cpp-python's ctypes bindings
(`llama_cpp.llama_*`, not the high-level `Llama` class, whose `embed()` tokenizes text and
silently truncates to n_batch). One context per peer: embeddings on, pooling MEAN, flash
attention off (the fp32 path), no KV cache (nomic-bert-moe is an encoder: `llama_encode`), all
layers on the CPU. Sequences are packed into one `llama_batch` as separate seq ids, up to
`batch_tokens` tokens per `llama_encode` call; llama.cpp computes a batch's attention as one
[n_tokens, n_tokens] product with the other sequences masked out, so a larger pack trades
per-call overhead for wasted attention FLOPs. `batch_tokens` is the knob. Its default, 2048,
is llama.cpp's own default n_batch; on full-size F32 with 2 threads (a busy machine, so rough)
it beat 512 and 4096 on W2 (32 x 128: 34 s vs 47 s and 56 s) and tied 512 on W3 (mixed
lengths; 4096 took 1.8x as long). A sequence longer than `max_tokens` (512) or `batch_tokens`
is refused, never truncated, and every pooled vector is checked to be present and finite.

llama.cpp's CPU threads (OpenMP here) busy-wait at every graph node: with more runnable
threads than free cores it slows down by several times (one short text: 130 ms with 1
thread, 650 ms with 2 on a machine with a load of 5). Time it on a quiet machine.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_TOKENS = 512
BATCH_TOKENS = 2048  # tokens per llama_encode call (n_ctx = n_batch = n_ubatch)
_LOG_CALLBACK = None  # keep the ctypes callback alive for the process's lifetime


def _quiet(llama_cpp, verbose: bool) -> None:
    """Route llama.cpp's log lines to nowhere (unless verbose): it logs every load to stderr."""
    global _LOG_CALLBACK
    if verbose or _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ARG001
        return None

    _LOG_CALLBACK = _drop
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaPeer:
    """One llama.cpp model + context for embeddings; not thread-safe (one call at a time)."""

    def __init__(self, gguf_path: str | Path, threads: int, batch_tokens: int = BATCH_TOKENS,
                 max_tokens: int = MAX_TOKENS, verbose: bool = False) -> None:
        from llama_peer.provision import check_installed

        check_installed()
        import llama_cpp

        self._lib = llama_cpp
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise FileNotFoundError(self.path)
        self.threads = int(threads)
        self.max_tokens = int(max_tokens)
        self.batch_tokens = int(batch_tokens)
        if self.batch_tokens < self.max_tokens:
            raise ValueError(f"batch_tokens {batch_tokens} < max_tokens {max_tokens}: a "
                             "maximal sequence would not fit one llama_encode call")
        _quiet(llama_cpp, verbose)
        llama_cpp.llama_backend_init()

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")

        cp = llama_cpp.llama_context_default_params()
        cp.embeddings = True
        cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.batch_tokens
        self.max_seqs = min(self.batch_tokens, 256)  # LLAMA_MAX_SEQ
        cp.n_seq_max = self.max_seqs
        cp.kv_unified = True  # no KV cache here; keeps n_ctx per sequence = n_ctx
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {self.path}")
        self.dim = int(llama_cpp.llama_model_n_embd(self._model))
        pooling = llama_cpp.llama_pooling_type(self._ctx)
        if pooling != llama_cpp.LLAMA_POOLING_TYPE_MEAN:
            raise RuntimeError(f"llama.cpp context pooling type {pooling}, expected MEAN")
        if llama_cpp.llama_n_ubatch(self._ctx) < self.batch_tokens:
            raise RuntimeError("llama.cpp reduced n_ubatch below batch_tokens")
        self._alloc_batch()

    def _alloc_batch(self) -> None:
        """A llama_batch whose arrays are numpy-owned: filled with slices, not per-token calls."""
        n = self.batch_tokens
        self._tok = np.zeros(n, dtype=np.int32)
        self._pos = np.zeros(n, dtype=np.int32)
        self._nseq = np.ones(n, dtype=np.int32)
        self._seq = np.zeros(n, dtype=np.int32)
        self._out = np.ones(n, dtype=np.int8)  # every token is an output (embeddings)
        self._seq_ptrs = (self._seq.ctypes.data + 4 * np.arange(n, dtype=np.uintp)).astype(
            np.uintp)
        lib = self._lib
        b = lib.llama_batch()
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        b.n_seq_id = self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = self._seq_ptrs.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id)))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _check(self, ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        seqs = [np.asarray(x, dtype=np.int32) for x in ids]
        if not seqs:
            raise ValueError("no sequences")
        for i, s in enumerate(seqs):
            if s.ndim != 1 or s.size == 0:
                raise ValueError(f"ids[{i}] is empty or not a flat list")
            if s.size > self.max_tokens:
                raise ValueError(f"ids[{i}] has {s.size} tokens > {self.max_tokens}: refused, "
                                 "not truncated")
        return seqs

    def _groups(self, seqs: list[np.ndarray]) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        used = 0
        for i, s in enumerate(seqs):
            if groups[-1] and (used + s.size > self.batch_tokens
                               or len(groups[-1]) >= self.max_seqs):
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += s.size
        return groups

    def _encode(self, seqs: list[np.ndarray], group: list[int], out: np.ndarray | None) -> None:
        n = 0
        for slot, i in enumerate(group):
            k = seqs[i].size
            self._tok[n:n + k] = seqs[i]
            self._pos[n:n + k] = np.arange(k, dtype=np.int32)
            self._seq[n:n + k] = slot
            n += k
        self._batch.n_tokens = n
        rc = self._lib.llama_encode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_encode failed ({rc}) on {len(group)} sequences, {n} tokens")
        if out is None:
            return
        for slot, i in enumerate(group):
            ptr = self._lib.llama_get_embeddings_seq(self._ctx, slot)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no pooled embedding for sequence {i}")
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.dim,))

    def pooled(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled (not normalized) float32 [B, H], in input order."""
        seqs = self._check(ids)
        out = np.full((len(seqs), self.dim), np.nan, dtype=np.float32)
        for group in self._groups(seqs):
            self._encode(seqs, group, out)
        if not np.isfinite(out).all():
            raise RuntimeError("llama.cpp returned non-finite or missing embeddings")
        return out

    def embed(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, L2-normalized float32 [B, H]."""
        v = self.pooled(ids)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def run(self, ids: Sequence[Sequence[int]]) -> None:
        """The same llama.cpp work as embed(), reading nothing back: for timing."""
        seqs = self._check(ids)
        for group in self._groups(seqs):
            self._encode(seqs, group, None)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (with <s> ... </s>)."""
        lib = self._lib
        vocab = lib.llama_model_get_vocab(self._model)
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(vocab, raw, len(raw), buf, cap, True, False)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(vocab, raw, len(raw), buf, cap, True, False)
        return list(buf[:n])


# ---------------------------------------------------------------------------------------------
# --check: F32 GGUF vs the project's fp32 PyTorch reference, tiny and full, zero expert bias
#
# llama.cpp computes GELU as the tanh form looked up in an fp16 table (ggml's GGML_GELU_FP16),
# the reference as exact erf. That moves embeddings by ~1e-4, and where a token's 2nd and 3rd
# router probabilities are within ~1e-4 it flips the expert choice (synthetic routers have such
# near-ties now and then). So the check runs the reference twice: exact, and with ggml's GELU
# emulated. llama.cpp must match the exact one (cos >= 0.99999) on every text whose expert
# choices the GELU form does not change, and one of the two on the others.

TASKS = ("search_document", "search_query")
MIN_COS = 0.99999


def zero_bias_checkpoint(size: str, seed: int = 0, cache: Path | None = None) -> Path:
    """A cached synthetic checkpoint with zero expert bias (llama.cpp drops that tensor)."""
    from llama_peer.provision import paths
    from moe_embed.export.synthetic import write_synthetic

    root = paths(cache).root / "checkpoints" / f"{size}-seed{seed}-zero-expert-bias"
    if not (root / ".complete").is_file():
        write_synthetic(root, size, seed, zero_expert_bias=True)
        (root / ".complete").write_text("ok\n")
    return root


def multilingual_ids(checkpoint: Path, task: str = "search_document") -> tuple[list[str],
                                                                                list[list[int]]]:
    import json

    from moe_embed.service.tasks import task_named
    from moe_embed.service.tokenizer import Tokenizer

    texts = json.loads((Path(__file__).resolve().parents[2] / "tests" / "data"
                        / "multilingual.json").read_text())
    tok = Tokenizer(checkpoint / "tokenizer.json")
    return texts, [x.tolist() for x in tok.encode(texts, task_named(task))]


class _GgmlFunctional:
    """torch.nn.functional with gelu replaced by ggml's: input rounded to fp16, tanh-form GELU,
    result rounded to fp16; x <= -10 gives 0 and x >= 10 gives x (ggml_vec_gelu_f32)."""

    def __getattr__(self, name):
        import torch.nn.functional

        return getattr(torch.nn.functional, name)

    @staticmethod
    def gelu(x, approximate: str = "none"):
        import torch
        import torch.nn.functional as F

        y = F.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


class Reference:
    """The project's fp32 PyTorch reference on one checkpoint, one text per forward."""

    def __init__(self, checkpoint: Path) -> None:
        from moe_embed.export.checkpoint import load_checkpoint
        from moe_embed.export.reference import ReferenceModel

        ck = load_checkpoint(str(checkpoint))
        self.model = ReferenceModel.from_tensors(ck.config, ck.tensors)

    def embed(self, ids: list[list[int]], gelu: str = "exact"
              ) -> tuple[np.ndarray, list[dict[int, np.ndarray]]]:
        """Normalized mean-pooled [B, H] and, per text, {MoE layer: expert ids [S, k]}."""
        import torch

        import moe_embed.export.reference as ref_module
        from moe_embed.export.reference import pad_batch

        saved = ref_module.F
        if gelu == "ggml":
            ref_module.F = _GgmlFunctional()
        try:
            vecs, routes = [], []
            with torch.inference_mode():
                for x in ids:
                    input_ids, mask = pad_batch([x])
                    hidden, routing = self.model(input_ids, mask)
                    v = hidden[0].mean(0)
                    vecs.append((v / v.norm()).numpy())
                    routes.append({k: e[0].numpy() for k, e in routing.items()})
        finally:
            ref_module.F = saved
        return np.stack(vecs).astype(np.float32), routes


def reference_embeddings(checkpoint: Path, ids: list[list[int]]) -> np.ndarray:
    """The fp32 PyTorch reference (exact GELU), one text at a time, normalized."""
    return Reference(checkpoint).embed(ids)[0]


def tokenizer_agreement(peer: LlamaPeer, texts: list[str], ids: list[list[int]],
                        task_prefix: str) -> dict:
    same = []
    for t, x in zip(texts, ids, strict=True):
        theirs = peer.tokenize(task_prefix + t)
        if len(theirs) > len(x) == peer.max_tokens:  # moe_embed's truncation keeps </s>
            theirs = theirs[: len(x) - 1] + theirs[-1:]
        same.append(theirs == x)
    return {"texts": len(same), "identical": int(sum(same)),
            "differing": [i for i, s in enumerate(same) if not s]}


def _compare(v: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, dict]:
    cos = (v.astype(np.float64) * ref).sum(axis=1)
    return cos, {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                 "max_abs": float(np.abs(v - ref).max())}


def check(size: str, threads: int, seed: int = 0) -> dict:
    import time

    from llama_peer.ggufs import make_ggufs

    t0 = time.perf_counter()
    ckpt = zero_bias_checkpoint(size, seed)
    f32 = make_ggufs(ckpt, types=("F32",))["F32"]
    reference = Reference(ckpt)
    result: dict = {"size": size, "seed": seed, "gguf": str(f32), "threads": threads}
    ok = True
    with LlamaPeer(f32, threads=threads) as peer:
        for task in TASKS:
            texts, ids = multilingual_ids(ckpt, task)
            exact, r_exact = reference.embed(ids)
            emul, r_emul = reference.embed(ids, gelu="ggml")
            flips = [i for i in range(len(ids))
                     if any((r_exact[i][k] != r_emul[i][k]).any() for k in r_exact[i])]
            one = np.concatenate([peer.embed([x]) for x in ids])
            batch = peer.embed(ids)
            cos, vs_exact = _compare(one, exact)
            kept = [i for i in range(len(ids)) if i not in flips]
            vs_exact["min_cos_where_routing_agrees"] = float(cos[kept].min())
            cos_emul, vs_emul = _compare(one, emul)
            vs_exact["routing_flipped_by_gelu"] = {
                i: {"cos_exact": float(cos[i]), "cos_ggml_gelu": float(cos_emul[i])}
                for i in flips}
            cos_b, vs_exact_batched = _compare(batch, exact)
            # a text whose expert choices the GELU form flips must match one of the two
            task_ok = bool(cos[kept].min() >= MIN_COS and cos_b[kept].min() >= MIN_COS
                           and all(max(cos[i], cos_emul[i]) >= MIN_COS for i in flips))
            ok &= task_ok
            result[task] = {
                "texts": len(ids), "tokens": [len(x) for x in ids],
                "vs_reference_exact_gelu": vs_exact,
                "vs_reference_ggml_gelu": vs_emul,
                "batched_vs_reference_exact_gelu": vs_exact_batched,
                "batched_vs_one_max_abs": float(np.abs(batch - one).max()),
                "llama_tokenizer": tokenizer_agreement(peer, texts, ids,
                                                       f"{task}: "),
                "pass": task_ok}
    result["pass"] = ok
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="llama.cpp peer: F32 GGUF vs the fp32 reference")
    ap.add_argument("--check", action="store_true", help="run the F32-vs-reference check")
    ap.add_argument("--sizes", default="tiny,full", help="comma list of tiny,full")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 2
    import torch

    torch.set_num_threads(args.threads)
    ok = True
    for size in args.sizes.split(","):
        r = check(size.strip(), args.threads)
        ok &= r["pass"]
        print(json.dumps(r), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
