"""llama.cpp as a benchmark peer and golden oracle (optional; never imported by the package).

Everything llama.cpp lives in the bench cache, `$MOE_EMBED_BENCH_CACHE/llama-cpp` (default
`~/.cache/moe-embed/bench/llama-cpp`), set up by `provision.py` (`make llama-peer`):

- a `llama-cpp-python` wheel built from the PyPI sdist with GGML_NATIVE=ON, one per CPU
  instruction-set family (a native build SIGILLs on a machine without the same ISA),
  installed into the project venv;
- llama.cpp's own converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`) extracted
  from that same sdist, run in a separate tool venv (it needs torch, transformers,
  sentencepiece, protobuf: too heavy for the project venv);
- GGUF files of synthetic checkpoints (`ggufs.py`), keyed by the checkpoint's sha256.

The modules here are named so that none shadows `llama_cpp` or `gguf` when benchmarks/ or
this folder is first on sys.path.
"""

# The one pin: the PyPI version of llama-cpp-python (it vendors llama.cpp, whose converter and
# gguf-py come from the same sdist, so the converter always matches the runtime).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# The converter's Python dependencies, for a NomicBertModel (nomic-bert-moe) checkpoint with an
# XLM-R tokenizer.json: torch (imported at the top of convert_hf_to_gguf.py), transformers
# (AutoConfig; AutoTokenizer reads tokenizer.json for the XLM-R vocabulary), sentencepiece
# (imported by the XLM-R vocab path even without a .model file) and protobuf < 5 (its
# sentencepiece_model_pb2), numpy, and gguf-py's own (pyyaml, tqdm, requests).
# torch==2.13.0 is the CPU wheel on this machine's disk: never an unpinned torch.
CONVERTER_REQUIREMENTS = (
    "torch==2.13.0",
    "transformers==4.57.6",
    "sentencepiece==0.2.1",
    "protobuf==4.25.8",
    "numpy==2.2.6",
    "pyyaml>=5.1",
    "tqdm>=4.27",
    "requests>=2.25",
)
