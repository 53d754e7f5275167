"""Builds the embedded default model:
`python -m moe_embed.export.demo_build CHECKPOINT BUNDLE SEED`.

Run by `service.demo` as a child process, so that torch and onnx (export's dependencies) never
load into the caller, which may be a server's frontend, and `serve` never imports `export`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .progress import Progress
from .split import export_bundle
from .synthetic import write_synthetic


def build(ckpt: Path, bundle_dir: Path, seed: int) -> None:
    """Write the tiny synthetic checkpoint, export it to `bundle_dir`, delete the checkpoint."""
    shutil.rmtree(ckpt, ignore_errors=True)
    write_synthetic(ckpt, "tiny", seed)
    export_bundle(str(ckpt), bundle_dir, progress=Progress("demo", "demo.export.progress"))
    shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
