"""Export a checkpoint to a bundle: dense segments + one graph per expert + router weights.

`routed` (the product): len(moe_layers)+1 dense segment graphs, E graphs per MoE layer, and the
router weights and expert biases as safetensors for the worker's torch router. `all-experts`
(benchmark peer only): the whole network as one graph that runs every expert.

`precision` picks a recipe (workers/bundle/recipes.py): fp32 writes the graphs as built; int8 and
int4 quantize each graph (export/quantize.py) right after it is built. The source may also be an
fp32 routed bundle: its graphs are read one by one instead of the checkpoint's tensors, which gives
the same graphs, so the same quantized bundle.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

from ..workers.bundle.config import ModelConfig
from ..workers.bundle.format import (
    FORMAT_VERSION,
    MANIFEST,
    MOE_MODES,
    Bundle,
    BundleError,
    DimensionRange,
    Graphs,
    Manifest,
    SegmentEntry,
    write_manifest,
)
from ..workers.bundle.recipes import Kind, Recipe, TensorStorage, get_recipe
from .checkpoint import Checkpoint, load_checkpoint
from .onnx_graphs import OPSET, all_experts_graph, expert_graph, expert_weights, plan_segments
from .onnx_graphs import segment_graph as build_segment
from .quantize import quantize_graph, storage_records, tensor_bytes

__all__ = ["LAYOUT", "MOE_MODES", "export_bundle", "is_bundle"]
ProgressFn = Callable[[int, int, str], None]
LAYOUT = 2  # how export writes a bundle (2: weights beside each graph, mapped); cache keys
EXTERNAL_MIN = 1024  # initializers this large go to the graph's data file (_save)
PAGE = 4096  # their offsets there: ONNX Runtime maps a page-aligned one instead of copying it
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")


def default_dims_range(cfg: ModelConfig) -> tuple[int, int]:
    """Matryoshka range: the real 768-d model is trained for 256..768 (its card); smaller widths
    get the same ratio."""
    return (256, 768) if cfg.n_embd == 768 else (max(8, cfg.n_embd // 4), cfg.n_embd)


def _save(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write a graph, its initializers of EXTERNAL_MIN bytes or more in a data file beside it at
    page-aligned offsets; return the bundle-relative file names it occupies.

    ONNX Runtime maps a page-aligned external initializer into memory instead of copying it: a
    worker then starts without reading the 733 MiB embedding table into fresh memory (~1.4 s
    of the fp32 start), holds only the rows it has used, and shares them with every process
    that maps the same file (the page cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    external = [t for t in model.graph.initializer if tensor_bytes(t) >= EXTERNAL_MIN]
    if not external:
        onnx.save_model(model, str(path))
        return [path.name]
    data = path.name + ".data"
    with open(path.with_name(data), "wb") as f:
        for t in external:
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            f.write(b"\0" * (-f.tell() % PAGE))
            offset = f.tell()
            f.write(raw)
            for field in _DATA_FIELDS:
                t.ClearField(field)
            del t.external_data[:]
            for key, value in (("location", data), ("offset", offset), ("length", len(raw))):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(path))
    return [path.name, data]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, not a local path


def _model_id(ck: Checkpoint) -> str:
    """The served model's default name: the hub id given, else the hub id the checkpoint's
    config names (`_name_or_path`, as transformers writes it), else the folder name."""
    if ck.source["kind"] == "hub":
        return str(ck.source["id"])
    if ck.raw_config.get("synthetic"):
        return f"synthetic-{'full' if ck.config.n_embd == 768 else 'tiny'}"
    named = ck.raw_config.get("_name_or_path")
    if isinstance(named, str) and _HUB_ID.fullmatch(named):
        return named
    return Path(str(ck.source["path"])).name


class _FromCheckpoint:
    """Graphs built from a checkpoint's tensors."""

    def __init__(self, ck: Checkpoint) -> None:
        self.ck, self.cfg = ck, ck.config
        self.model_id, self.source, self.raw_config = _model_id(ck), ck.source, ck.raw_config
        self.tokenizer_path = ck.tokenizer_path
        self.dimensions = DimensionRange(*default_dims_range(ck.config))
        self.max_tokens = ck.config.max_tokens
        self.origin: dict[str, Any] = {}

    def segments(self) -> Iterator[tuple[SegmentEntry, onnx.ModelProto]]:
        for seg in plan_segments(self.cfg):
            rel = f"segments/segment_{seg.index:02d}.onnx"
            yield (SegmentEntry(rel, seg.moe_residual, tuple(seg.full_layers), seg.attn_layer,
                                seg.needs_mask), build_segment(self.cfg, seg, self.ck.tensors))

    def experts(self, layer: int) -> Iterator[tuple[str, onnx.ModelProto]]:
        w1, w2 = expert_weights(self.cfg, self.ck.tensors, layer)
        for e in range(self.cfg.num_experts):
            yield (f"experts/layer_{layer:02d}/expert_{e}.onnx",
                   expert_graph(w1[e], w2[e], f"l{layer}_e{e}"))

    def write_router(self, path: Path) -> None:
        router: dict[str, torch.Tensor] = {}
        for layer in self.cfg.moe_layers:
            p = f"encoder.layers.{layer}.mlp."
            router[f"{layer}.router"] = self.ck.tensors[p + "router.layer.weight"].contiguous()
            router[f"{layer}.expert_bias"] = self.ck.tensors[p + "experts.bias"].contiguous()
        save_file(router, str(path))

    def all_experts(self) -> onnx.ModelProto:
        return all_experts_graph(self.cfg, self.ck.tensors)


class _FromBundle:
    """The graphs of an existing routed fp32 bundle, read one at a time (the checkpoint is not
    needed: a quantized export of the full model then never holds all its weights at once)."""

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        if m.moe_mode != "routed":
            raise BundleError(f"{bundle.path}: an {m.moe_mode} bundle cannot be re-exported "
                              "(its single graph has no segments or experts to quantize); "
                              "export from the checkpoint")
        if m.precision != "fp32":
            raise BundleError(f"{bundle.path}: already quantized ({m.precision}); a bundle can "
                              "only be exported from a checkpoint or an fp32 bundle")
        self.bundle, self.cfg = bundle, m.config
        self.model_id, self.source = m.model_id, m.source
        self.raw_config = json.loads(bundle.path.joinpath("config.json").read_text())
        self.tokenizer_path = bundle.file(m.tokenizer)
        self.dimensions, self.max_tokens = m.dimensions, m.max_tokens
        self.origin = {"from_bundle": {"path": str(bundle.path.resolve()),
                                       "manifest_sha256": bundle.digest}}

    def segments(self) -> Iterator[tuple[SegmentEntry, onnx.ModelProto]]:
        for entry in self.bundle.manifest.graphs.segments:
            yield entry, onnx.load(str(self.bundle.file(entry.file)))

    def experts(self, layer: int) -> Iterator[tuple[str, onnx.ModelProto]]:
        for rel in self.bundle.manifest.graphs.experts[layer]:
            yield rel, onnx.load(str(self.bundle.file(rel)))

    def write_router(self, path: Path) -> None:
        shutil.copyfile(self.bundle.file(self.bundle.manifest.graphs.router), path)

    def all_experts(self) -> onnx.ModelProto:
        raise AssertionError("unreachable: refused in __init__")


def is_bundle(source: str | Path) -> bool:
    """Whether `source` names a bundle directory (it has a manifest.json)."""
    return Path(source).expanduser().joinpath(MANIFEST).is_file()


def export_bundle(source: str | Checkpoint, out: str | Path, moe_mode: str = "routed",
                  revision: str | None = None, progress: ProgressFn | None = None,
                  precision: str = "fp32", recipe: Recipe | None = None) -> Path:
    """Write a complete, hashed bundle for `source` (hub id, local dir, loaded checkpoint, or the
    directory of an fp32 routed bundle) at `precision` (a recipe of workers/bundle/recipes.py).

    Each graph is quantized as it is built and written before the next one is made. The manifest
    records the recipe and, for every initializer of every graph, how it is stored. `recipe`
    replaces the shipped recipe of `precision` (recipe exploration, benchmarks/quant_recipes.py);
    its name must be `precision`.
    """
    if moe_mode not in MOE_MODES:
        raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {moe_mode!r}")
    shipped = get_recipe(precision)
    if recipe is None:
        recipe = shipped
    elif recipe.validate().name != precision:
        raise ValueError(f"recipe {recipe.name!r} given for precision {precision!r}: a bundle's "
                         "recipe carries its precision's name")
    if moe_mode == "all-experts" and precision != "fp32":
        raise ValueError(f"moe_mode all-experts is a benchmark peer exported in fp32 only, "
                         f"not {precision}")
    if isinstance(source, Checkpoint):
        src: _FromCheckpoint | _FromBundle = _FromCheckpoint(source)
    elif is_bundle(source):
        if moe_mode != "routed":
            raise BundleError(f"{source}: an all-experts bundle is exported from the checkpoint, "
                              "not from a bundle")
        src = _FromBundle(Bundle.load(Path(source).expanduser()))  # hashes verified
    else:
        src = _FromCheckpoint(load_checkpoint(source, revision))
    cfg = src.cfg
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[str] = []
    tensors: list[TensorStorage] = []
    report = progress or (lambda step, total, what: None)

    norms: dict[str, np.ndarray] = {}  # every segment's norm1 gain and bias, by name

    def emit(step: int, total: int, rel: str, model: onnx.ModelProto, kind: Kind | None,
             layer: int | None = None) -> list[str]:
        if kind == "segment":
            norms.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                          if t.name.endswith((".norm1.weight", ".norm1.bias"))})
        if kind is None or recipe.is_identity:
            records = storage_records(model, kind, layer)
        else:
            norm = None
            if kind == "expert":  # its input is norm1's output of its layer, in a segment
                p = f"encoder.layers.{layer}.norm1."
                norm = (norms[p + "weight"], norms[p + "bias"])
            model, records = quantize_graph(model, recipe, kind, layer, norm)
        names = _save(model, tmp / rel)
        del model
        rels = [str(Path(rel).parent / n) if Path(rel).parent != Path(".") else n for n in names]
        files.extend(rels)
        tensors.extend(replace(r, file=rel) for r in records)
        report(step, total, rel)
        return rels

    if moe_mode == "routed":
        total = len(cfg.moe_layers) + 1 + len(cfg.moe_layers) * cfg.num_experts + 1
        step = 0
        segments = []
        for entry, model in src.segments():
            step += 1
            emit(step, total, entry.file, model, "segment")
            segments.append(entry)
            del model
        experts: dict[int, tuple[str, ...]] = {}
        for layer in cfg.moe_layers:
            rels = []
            for rel, model in src.experts(layer):
                step += 1
                emit(step, total, rel, model, "expert", layer)
                rels.append(rel)
                del model
            experts[layer] = tuple(rels)
        src.write_router(tmp / "router.safetensors")
        files.append("router.safetensors")
        graphs = Graphs(tuple(segments), experts, "router.safetensors")
        report(total, total, "router.safetensors")
    else:
        graphs = Graphs(model=emit(1, 1, "model.onnx", src.all_experts(), None)[0])

    shutil.copyfile(src.tokenizer_path, tmp / "tokenizer.json")
    (tmp / "config.json").write_text(json.dumps(src.raw_config, indent=2) + "\n")
    files += ["tokenizer.json", "config.json"]
    exporter = {"format_version": FORMAT_VERSION, "onnx_opset": OPSET, "onnx": onnx.__version__,
                "torch": torch.__version__, **src.origin}
    if not recipe.is_identity:
        exporter["onnxruntime"] = _ort_version()
    write_manifest(tmp, Manifest(
        model_id=src.model_id,
        source=src.source,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        precision=precision,
        moe_mode=moe_mode,
        config=cfg,
        max_tokens=src.max_tokens,
        dimensions=src.dimensions,
        tokenizer="tokenizer.json",
        graphs=graphs,
        exporter=exporter,
        recipe=recipe,
        tensors=tuple(tensors),
    ), files)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _ort_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime")
