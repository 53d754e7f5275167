"""Session fixtures: a tiny synthetic checkpoint in the upstream format and its exported bundles.

Everything here is real: real safetensors, the real XLM-R tokenizer, real ONNX Runtime sessions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# torch and ONNX are imported by the fixtures that need them, so the fast unit tests (and the
# mutation runs that repeat them) start in a fraction of a second

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def multilingual_texts() -> list[str]:
    return json.loads((DATA / "multilingual.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_embed.export.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_embed.export.split import export_bundle

    return export_bundle(str(tiny_checkpoint), tmp_path_factory.mktemp("bundle") / "routed")


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoint: Path, tiny_bundle: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The routed bundle at every precision, each exported from the checkpoint."""
    from moe_embed.export.split import export_bundle

    out = {"fp32": tiny_bundle}
    for precision in ("int8", "int4"):
        out[precision] = export_bundle(str(tiny_checkpoint),
                                       tmp_path_factory.mktemp("bundle") / precision,
                                       precision=precision)
    return out


@pytest.fixture(scope="session")
def tiny_all_experts_bundle(tiny_checkpoint: Path,
                            tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_embed.export.split import export_bundle

    return export_bundle(str(tiny_checkpoint), tmp_path_factory.mktemp("bundle") / "all",
                         moe_mode="all-experts")


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):  # -> ReferenceModel
    from moe_embed.export.checkpoint import load_checkpoint
    from moe_embed.export.reference import ReferenceModel

    ck = load_checkpoint(str(tiny_checkpoint))
    return ReferenceModel.from_tensors(ck.config, ck.tensors)
