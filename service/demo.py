"""The embedded default model: a tiny synthetic checkpoint with the real XLM-R tokenizer.

Built and exported on first use under the cache directory, so `moe-embed serve` works on a fresh
machine with no download. Its vectors are NOT meaningful: it exists to run the whole stack.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
from pathlib import Path

from ..export.bundle import Bundle, BundleError
from ..export.progress import Progress, json_logger

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
        child = multiprocessing.get_context("spawn").Process(
            target=_build, args=(cache / DEMO_NAME / "checkpoint", bundle_dir),
            name="moe-embed-demo-build")
        child.start()
        child.join()
        if child.exitcode != 0:
            raise BundleError(f"building the demo model in {cache} failed "
                              f"(exit code {child.exitcode}); see the log above")
        log.info("demo.ready", bundle=str(bundle_dir))
    return bundle_dir


def _build(ckpt: Path, bundle_dir: Path) -> None:
    from ..export.split import export_bundle
    from ..export.synthetic import write_synthetic

    shutil.rmtree(ckpt, ignore_errors=True)
    write_synthetic(ckpt, "tiny", DEMO_SEED)
    export_bundle(str(ckpt), bundle_dir, progress=Progress("demo", "demo.export.progress"))
    shutil.rmtree(ckpt, ignore_errors=True)
