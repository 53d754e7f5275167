"""ONNX graphs for the pieces of the network, built op by op from named weights.

Built directly with `onnx.helper` rather than traced: nothing of an example input (sequence length,
routing) can be baked into a graph, shapes stay dynamic in batch and sequence, and exporting the
475M model is a matter of writing arrays. Each graph mirrors `reference.py` op for op.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..workers.bundle.config import ModelConfig

OPSET = 20  # LayerNormalization (17) and exact-erf Gelu (20)
IR_VERSION = 10
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


def rotary_tables(cfg: ModelConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [S, head_dim] of GPT-NeoX "rotate half" rotary, angles in fp32: lane j and lane
    j + head_dim/2 share the angle position * base^(-2j/head_dim). Written here, not taken from
    the reference, so that the oracle and the exporter cannot share one mistake."""
    d = cfg.head_dim
    half = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv_freq = np.float32(1.0) / np.power(np.float32(cfg.rotary_emb_base), half)
    angles = np.outer(np.arange(seq_len, dtype=np.float32), inv_freq).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers; `op` returns the name of the node's (first) output."""

    name: str
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    _n: int = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))  # keeps 0-d
        return name

    def ints(self, values: Iterable[int]) -> str:
        return self.const(self.fresh("ints"), np.asarray(list(values), dtype=np.int64))

    def scalar(self, value: float) -> str:
        return self.const(self.fresh("scalar"), np.asarray(value, dtype=np.float32))

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1, **attrs):
        outs = [out] if out else [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="moe-embed")
        m.ir_version = IR_VERSION
        return m


def _linear(g: GraphBuilder, x: str, tensors: dict, prefix: str) -> str:
    """x @ W.T + b with W stored pre-transposed so the MatMul reads it row-major."""
    w = g.const(prefix + ".weight.T", _np(tensors[prefix + ".weight"]).T.copy())
    b = g.const(prefix + ".bias", _np(tensors[prefix + ".bias"]))
    return g.op("Add", g.op("MatMul", x, w), b)


def _layer_norm(g: GraphBuilder, x: str, tensors: dict, prefix: str, eps: float) -> str:
    w = g.const(prefix + ".weight", _np(tensors[prefix + ".weight"]))
    b = g.const(prefix + ".bias", _np(tensors[prefix + ".bias"]))
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=eps)


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])."""
    lo, hi = g.op("Split", x, axis=-1, num_outputs=2, n_out=2)
    rotated = g.op("Concat", g.op("Neg", hi), lo, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


@dataclass
class _Shared:
    """Per-graph values every attention layer reuses: key bias and rotary tables for this S.

    In the packed layout (routed segments) the hidden states are [N, H], real tokens only, so
    no linear layer ever computes a padding row; attention alone gathers them into [B, S]:
    `pad_index` [B*S] names the packed row of every padded slot (padding slots point at any
    real row; their keys are masked and their outputs dropped) and `unpad_index` [N] the
    padded slot of every packed row.
    """

    key_bias: str
    cos: str
    sin: str
    pad_index: str | None = None
    unpad_index: str | None = None
    qkv_shape: str | None = None  # [B, S, 3, nh, hd], packed layout only


def _shared_inputs(g: GraphBuilder, cfg: ModelConfig, mask: str, packed: bool = False) -> _Shared:
    maskf = g.op("Cast", mask, to=F32)  # [B, S]
    inv = g.op("Sub", g.scalar(1.0), maskf)
    bias = g.op("Mul", inv, g.scalar(float(np.finfo(np.float32).min)))
    key_bias = g.op("Unsqueeze", bias, g.ints([1, 2]))  # [B, 1, 1, S]
    cos_t, sin_t = rotary_tables(cfg, cfg.max_tokens)
    mask_shape = g.op("Shape", mask)  # [B, S]
    seq = g.op("Gather", mask_shape, g.ints([1]), axis=0)  # [1] = S
    zero = g.ints([0])
    cos = g.op("Slice", g.const("rotary.cos", cos_t), zero, seq, zero)  # [S, hd]
    sin = g.op("Slice", g.const("rotary.sin", sin_t), zero, seq, zero)
    if not packed:
        return _Shared(key_bias, cos, sin)
    qkv_shape = g.op("Concat", mask_shape, g.ints([3, cfg.n_head, cfg.head_dim]), axis=0)
    return _Shared(key_bias, cos, sin, "pad_index", "unpad_index", qkv_shape)


def _attention_block(g: GraphBuilder, cfg: ModelConfig, x: str, tensors: dict, layer: int,
                     sh: _Shared) -> str:
    """norm1(x + out_proj(attention(x))) for `layer`."""
    p = f"encoder.layers.{layer}."
    nh, hd, h = cfg.n_head, cfg.head_dim, cfg.n_embd
    qkv = _linear(g, x, tensors, p + "attn.Wqkv")  # [B, S, 3H], packed: [N, 3H]
    if sh.pad_index is not None:
        qkv = g.op("Reshape", g.op("Gather", qkv, sh.pad_index, axis=0), sh.qkv_shape)
    else:
        qkv = g.op("Reshape", qkv, g.ints([0, 0, 3, nh, hd]))
    qkv = g.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])  # [3, B, nh, S, hd]
    q, k, v = (g.op("Gather", qkv, g.const(g.fresh("idx"), np.asarray(i, dtype=np.int64)), axis=0)
               for i in range(3))  # each [B, nh, S, hd]
    q, k = _rotate(g, q, sh.cos, sh.sin), _rotate(g, k, sh.cos, sh.sin)
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = g.op("Add", g.op("Div", scores, g.scalar(math.sqrt(hd))), sh.key_bias)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, nh, S, hd]
    ctx = g.op("Transpose", ctx, perm=[0, 2, 1, 3])  # [B, S, nh, hd]
    if sh.unpad_index is not None:
        ctx = g.op("Gather", g.op("Reshape", ctx, g.ints([-1, h])), sh.unpad_index, axis=0)
    else:
        ctx = g.op("Reshape", ctx, g.ints([0, 0, h]))
    attn = _linear(g, ctx, tensors, p + "attn.out_proj")
    return _layer_norm(g, g.op("Add", x, attn), tensors, p + "norm1", cfg.layer_norm_epsilon)


def _dense_ffn_block(g: GraphBuilder, cfg: ModelConfig, x: str, tensors: dict, layer: int) -> str:
    p = f"encoder.layers.{layer}."
    y = _linear(g, g.op("Gelu", _linear(g, x, tensors, p + "mlp.fc1")), tensors, p + "mlp.fc2")
    return _layer_norm(g, g.op("Add", x, y), tensors, p + "norm2", cfg.layer_norm_epsilon)


def _embeddings(g: GraphBuilder, cfg: ModelConfig, ids: str, tensors: dict) -> str:
    table = g.const("word_embeddings", _np(tensors["embeddings.word_embeddings.weight"]))
    type0 = g.const("token_type_0", _np(tensors["embeddings.token_type_embeddings.weight"][0]))
    x = g.op("Add", g.op("Gather", table, ids, axis=0), type0)
    return _layer_norm(g, x, tensors, "emb_ln", cfg.layer_norm_epsilon)


@dataclass(frozen=True)
class Segment:
    """A dense stretch: optionally closes MoE layer `moe_residual` (x = norm2(h + moe_out)),
    runs `full_layers` completely, then the attention half of `attn_layer` (the next MoE layer)."""

    index: int
    moe_residual: int | None
    full_layers: tuple[int, ...]
    attn_layer: int | None

    @property
    def needs_mask(self) -> bool:
        return bool(self.full_layers) or self.attn_layer is not None


def plan_segments(cfg: ModelConfig) -> list[Segment]:
    """Cut the network at every MoE FFN: len(moe_layers) + 1 dense segments."""
    segments, full, residual = [], [], None
    for i in range(cfg.n_layer):
        if cfg.is_moe(i):
            segments.append(Segment(len(segments), residual, tuple(full), i))
            full, residual = [], i
        else:
            full.append(i)
    segments.append(Segment(len(segments), residual, tuple(full), None))
    return segments


def _value(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def segment_graph(cfg: ModelConfig, seg: Segment, tensors: dict) -> onnx.ModelProto:
    """A routed dense segment in the packed layout: real tokens only, [N, H].

    Inputs: input_ids [N] (first segment) or hidden + moe_out [N, H]; with attention also
    attention_mask [B, S], pad_index [B*S] and unpad_index [N] (see _Shared). Output: hidden.
    """
    g = GraphBuilder(f"segment_{seg.index:02d}")
    nh = ["tokens", cfg.n_embd]
    if seg.moe_residual is None:
        inputs = [_value("input_ids", I64, ["tokens"])]
        x = _embeddings(g, cfg, "input_ids", tensors)
    else:
        inputs = [_value("hidden", F32, nh), _value("moe_out", F32, nh)]
        p = f"encoder.layers.{seg.moe_residual}.norm2"
        x = _layer_norm(g, g.op("Add", "hidden", "moe_out"), tensors, p, cfg.layer_norm_epsilon)
    if seg.needs_mask:
        inputs += [_value("attention_mask", I64, ["batch", "seq"]),
                   _value("pad_index", I64, ["padded"]), _value("unpad_index", I64, ["tokens"])]
        sh = _shared_inputs(g, cfg, "attention_mask", packed=True)
        for layer in seg.full_layers:
            x = _dense_ffn_block(g, cfg, _attention_block(g, cfg, x, tensors, layer, sh), tensors,
                                 layer)
        if seg.attn_layer is not None:
            x = _attention_block(g, cfg, x, tensors, seg.attn_layer, sh)
    g.op("Identity", x, out="hidden_out")
    return g.model(inputs, [_value("hidden_out", F32, nh)])


def expert_weights(cfg: ModelConfig, tensors: dict, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """w1, w2 viewed [E, F, H]: expert e computes gelu(x @ w1[e].T) @ w2[e] (w2 NOT transposed)."""
    p = f"encoder.layers.{layer}.mlp.experts.mlp."
    e, f, h = cfg.num_experts, cfg.n_inner, cfg.n_embd
    return (_np(tensors[p + "w1"]).reshape(e, f, h), _np(tensors[p + "w2"]).reshape(e, f, h))


def expert_graph(w1_e: np.ndarray, w2_e: np.ndarray, name: str) -> onnx.ModelProto:
    """One expert as its own graph: x [N, H] -> gelu(x @ w1_e.T) @ w2_e -> [N, H]."""
    g = GraphBuilder(name)
    f, h = w1_e.shape
    w1t = g.const("w1.T", w1_e.T.copy())  # [H, F]
    w2 = g.const("w2", w2_e)  # [F, H]
    g.op("MatMul", g.op("Gelu", g.op("MatMul", "x", w1t)), w2, out="y")
    return g.model([_value("x", F32, ["tokens", h])], [_value("y", F32, ["tokens", h])])


def _all_experts_moe(g: GraphBuilder, cfg: ModelConfig, x: str, tensors: dict, layer: int) -> str:
    """The workaround we exist to beat: every token through all E experts, masked by routing."""
    p = f"encoder.layers.{layer}.mlp."
    e, f, h = cfg.num_experts, cfg.n_inner, cfg.n_embd
    flat = g.op("Reshape", x, g.ints([-1, h]))  # [N, H]
    router_t = g.const(p + "router.T", _np(tensors[p + "router.layer.weight"]).T.copy())
    probs = g.op("Softmax", g.op("MatMul", flat, router_t), axis=-1)  # [N, E]
    top_w, top_i = g.op("TopK", probs, g.ints([cfg.moe_top_k]), axis=-1, n_out=2)
    dense_w = g.op("ScatterElements", g.op("Mul", probs, g.scalar(0.0)), top_i, top_w, axis=1)
    w1, w2 = expert_weights(cfg, tensors, layer)
    w1_all = g.const(p + "w1.T", w1.reshape(e * f, h).T.copy())  # [H, E*F]
    w2_all = g.const(p + "w2", w2.reshape(e * f, h))  # [E*F, H]
    act = g.op("Reshape", g.op("Gelu", g.op("MatMul", flat, w1_all)), g.ints([-1, e, f]))
    act = g.op("Mul", act, g.op("Unsqueeze", dense_w, g.ints([2])))  # weight each expert's lanes
    y = g.op("MatMul", g.op("Reshape", act, g.ints([-1, e * f])), w2_all)
    y = g.op("Add", y, g.const(p + "experts.bias", _np(tensors[p + "experts.bias"])))
    return g.op("Reshape", y, g.op("Shape", x))


def all_experts_graph(cfg: ModelConfig, tensors: dict) -> onnx.ModelProto:
    """The whole network as one graph, every expert computed for every token (benchmark peer)."""
    g = GraphBuilder("all_experts")
    x = _embeddings(g, cfg, "input_ids", tensors)
    sh = _shared_inputs(g, cfg, "attention_mask")
    for layer in range(cfg.n_layer):
        x = _attention_block(g, cfg, x, tensors, layer, sh)
        if cfg.is_moe(layer):
            y = _all_experts_moe(g, cfg, x, tensors, layer)
            p = f"encoder.layers.{layer}.norm2"
            x = _layer_norm(g, g.op("Add", x, y), tensors, p, cfg.layer_norm_epsilon)
        else:
            x = _dense_ffn_block(g, cfg, x, tensors, layer)
    g.op("Identity", x, out="hidden_out")
    inputs = [_value("input_ids", I64, ["batch", "seq"]),
              _value("attention_mask", I64, ["batch", "seq"])]
    return g.model(inputs, [_value("hidden_out", F32, ["batch", "seq", cfg.n_embd])])
