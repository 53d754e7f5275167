"""Build, cache and reuse the `full` synthetic checkpoint and its two bundles.

Cached under $MOE_EMBED_BENCH_CACHE (default ~/.cache/moe-embed/bench) in a directory keyed by
size, seed and package version; a bundle is reused when `Bundle.load` verifies it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from moe_embed.export.split import LAYOUT, export_bundle
from moe_embed.export.synthetic import write_synthetic
from moe_embed.workers.bundle.format import Bundle, BundleError

DONE = ".bench-complete"


@dataclass
class Artifacts:
    checkpoint: Path
    routed: Bundle
    all_experts: Bundle
    build_s: dict[str, float]


def default_cache() -> Path:
    env = os.environ.get("MOE_EMBED_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe-embed" / "bench"


def _checkpoint(path: Path, size: str, seed: int, log) -> float:
    if (path / DONE).is_file():
        return 0.0
    log(f"building the {size} synthetic checkpoint (seed {seed}) in {path}")
    t = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    write_synthetic(path, size, seed=seed)
    (path / DONE).write_text("ok\n")
    return time.perf_counter() - t


def _bundle(ckpt: Path, path: Path, mode: str, log) -> tuple[Bundle, float]:
    try:
        return Bundle.load(path), 0.0
    except (BundleError, OSError, KeyError, ValueError) as exc:
        if path.exists():
            log(f"rebuilding {path}: {exc}")
    log(f"exporting the {mode} bundle to {path}")
    t = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    export_bundle(str(ckpt), path, moe_mode=mode)
    return Bundle.load(path), time.perf_counter() - t


def ensure(cache: Path, size: str = "full", seed: int = 0, log=print) -> Artifacts:
    root = cache / f"{size}-seed{seed}-v{version('moe-embed')}-layout{LAYOUT}"
    ckpt = root / "checkpoint"
    build = {"checkpoint": _checkpoint(ckpt, size, seed, log)}
    routed, build["routed"] = _bundle(ckpt, root / "routed", "routed", log)
    all_experts, build["all-experts"] = _bundle(ckpt, root / "all-experts", "all-experts", log)
    return Artifacts(ckpt, routed, all_experts, build)
