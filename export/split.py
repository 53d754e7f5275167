"""Export a checkpoint to a bundle: dense segments + one graph per expert + router weights.

`routed` (the product): len(moe_layers)+1 dense segment graphs, E graphs per MoE layer, and the
router weights and expert biases as safetensors for the worker's torch router.
`all-experts` (benchmark peer only): the whole network as one graph that runs every expert.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file

from .bundle import (
    FORMAT_VERSION,
    MOE_MODES,
    DimensionRange,
    Graphs,
    Manifest,
    SegmentEntry,
    write_manifest,
)
from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig
from .onnx_graphs import OPSET, all_experts_graph, expert_graph, expert_weights, plan_segments
from .onnx_graphs import segment_graph as build_segment

__all__ = ["MOE_MODES", "export_bundle"]
ProgressFn = Callable[[int, int, str], None]
_PROTO_LIMIT = 1 << 30  # above this, weights go to an external-data file beside the graph


def default_dims_range(cfg: ModelConfig) -> tuple[int, int]:
    """Matryoshka range: the real 768-d model is trained for 256..768 (its card); smaller widths
    get the same ratio."""
    return (256, 768) if cfg.n_embd == 768 else (max(8, cfg.n_embd // 4), cfg.n_embd)


def _save(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write a graph; return the bundle-relative file names it occupies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < _PROTO_LIMIT:
        onnx.save_model(model, str(path))
        return [path.name]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return [path.name, data]


def _model_id(ck: Checkpoint) -> str:
    if ck.source["kind"] == "hub":
        return str(ck.source["id"])
    if ck.raw_config.get("synthetic"):
        return f"synthetic-{'full' if ck.config.n_embd == 768 else 'tiny'}"
    return Path(str(ck.source["path"])).name


def export_bundle(source: str | Checkpoint, out: str | Path, moe_mode: str = "routed",
                  revision: str | None = None, progress: ProgressFn | None = None) -> Path:
    """Write a complete, hashed bundle for `source` (hub id, local dir or loaded checkpoint)."""
    if moe_mode not in MOE_MODES:
        raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {moe_mode!r}")
    ck = source if isinstance(source, Checkpoint) else load_checkpoint(source, revision)
    cfg, tensors = ck.config, ck.tensors
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[str] = []
    report = progress or (lambda step, total, what: None)

    def emit(step: int, total: int, rel: str, model: onnx.ModelProto) -> list[str]:
        names = _save(model, tmp / rel)
        rels = [str(Path(rel).parent / n) if Path(rel).parent != Path(".") else n for n in names]
        files.extend(rels)
        report(step, total, rel)
        return rels

    if moe_mode == "routed":
        plan = plan_segments(cfg)
        total = len(plan) + len(cfg.moe_layers) * cfg.num_experts + 1
        step = 0
        segments = []
        for seg in plan:
            step += 1
            rel = f"segments/segment_{seg.index:02d}.onnx"
            emit(step, total, rel, build_segment(cfg, seg, tensors))
            segments.append(SegmentEntry(rel, seg.moe_residual, tuple(seg.full_layers),
                                         seg.attn_layer, seg.needs_mask))
        experts: dict[int, tuple[str, ...]] = {}
        router: dict[str, torch.Tensor] = {}
        for layer in cfg.moe_layers:
            w1, w2 = expert_weights(cfg, tensors, layer)
            rels = []
            for e in range(cfg.num_experts):
                step += 1
                rel = f"experts/layer_{layer:02d}/expert_{e}.onnx"
                emit(step, total, rel, expert_graph(w1[e], w2[e], f"l{layer}_e{e}"))
                rels.append(rel)
            experts[layer] = tuple(rels)
            p = f"encoder.layers.{layer}.mlp."
            router[f"{layer}.router"] = tensors[p + "router.layer.weight"].contiguous()
            router[f"{layer}.expert_bias"] = tensors[p + "experts.bias"].contiguous()
        save_file(router, str(tmp / "router.safetensors"))
        files.append("router.safetensors")
        graphs = Graphs(tuple(segments), experts, "router.safetensors")
        report(total, total, "router.safetensors")
    else:
        graphs = Graphs(model=emit(1, 1, "model.onnx", all_experts_graph(cfg, tensors))[0])

    shutil.copyfile(ck.tokenizer_path, tmp / "tokenizer.json")
    (tmp / "config.json").write_text(json.dumps(ck.raw_config, indent=2) + "\n")
    files += ["tokenizer.json", "config.json"]
    lo, hi = default_dims_range(cfg)
    write_manifest(tmp, Manifest(
        model_id=_model_id(ck),
        source=ck.source,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        precision="fp32",
        moe_mode=moe_mode,
        config=cfg,
        max_tokens=cfg.max_tokens,
        dimensions=DimensionRange(lo, hi),
        tokenizer="tokenizer.json",
        graphs=graphs,
        exporter={"format_version": FORMAT_VERSION, "onnx_opset": OPSET,
                  "onnx": onnx.__version__, "torch": torch.__version__},
    ), files)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
