"""The embedded default model: a tiny synthetic checkpoint with the real XLM-R tokenizer.

Built and exported on first use under the cache directory, so `moe-embed serve` works on a fresh
machine with no download. Its vectors are NOT meaningful: it exists to run the whole stack.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from ..workers.bundle.format import Bundle, BundleError
from ..workers.logs import json_logger

DEMO_NAME = "demo-tiny-v2"  # v2: weights mapped from beside each graph (export LAYOUT 2)
DEMO_SEED = 0


def default_cache_dir() -> Path:
    env = os.environ.get("MOE_EMBED_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe-embed"


def ensure_demo_bundle(cache_dir: str | Path | None = None) -> Path:
    """Return the demo bundle directory, building it once (process-safe via a file lock)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    bundle_dir = cache / DEMO_NAME / "bundle"
    with open(cache / f"{DEMO_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            Bundle.load(bundle_dir, verify=True)
            return bundle_dir
        except BundleError:
            pass
        log = json_logger("demo")
        log.info("demo.build", cache_dir=str(cache),
                 note="tiny synthetic model with the real tokenizer; vectors are not meaningful")
        # in a child process: torch and onnx (export only) never load into the caller, which
        # may be the frontend of a server
        built = subprocess.run(
            [sys.executable, "-m", "moe_embed.export.demo_build",
             str(cache / DEMO_NAME / "checkpoint"), str(bundle_dir), str(DEMO_SEED)],
            check=False)
        if built.returncode != 0:
            raise BundleError(f"building the demo model in {cache} failed "
                              f"(exit code {built.returncode}); see the log above")
        log.info("demo.ready", bundle=str(bundle_dir))
    return bundle_dir

