"""The in-process peers, each behind `run(ids) -> expert_tokens | None`.

- routed: moe-embed's runtime (dense ONNX segments, torch router, one session per expert)
- all-experts: the single ONNX graph that computes all 8 experts for every token and masks
- torch: the PyTorch eager reference (upstream per-expert loop), with the same thread count
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np
import torch

from moe_embed.export.bundle import Bundle
from moe_embed.workers.runtime.runtime import Runtime, pack

PEERS = ("routed", "all-experts", "torch")


class OrtPeer:
    """moe-embed's Runtime over a routed or an all-experts bundle."""

    def __init__(self, name: str, bundle: Bundle, threads: int) -> None:
        self.name = name
        self.runtime = Runtime(bundle, threads=threads)

    def run(self, ids: Sequence[Sequence[int]]) -> np.ndarray | None:
        r = self.runtime.embed(*pack(ids))
        return r.expert_tokens if self.runtime.moe_mode == "routed" else None

    def close(self) -> None:
        del self.runtime
        gc.collect()


class TorchPeer:
    """The reference model in eager PyTorch on `threads` intra-op threads."""

    name = "torch"

    def __init__(self, checkpoint_dir: str, threads: int) -> None:
        from moe_embed.export.checkpoint import load_checkpoint
        from moe_embed.export.reference import ReferenceModel, pad_batch

        ck = load_checkpoint(checkpoint_dir)
        self.model = ReferenceModel.from_tensors(ck.config, ck.tensors)
        self.pad_id = ck.config.pad_token_id
        self._pad = pad_batch
        del ck
        gc.collect()
        torch.set_num_threads(threads)

    def run(self, ids: Sequence[Sequence[int]]) -> None:
        input_ids, mask = self._pad([list(x) for x in ids], self.pad_id)
        with torch.inference_mode():
            self.model.embed(input_ids, mask)
        return None

    def close(self) -> None:
        del self.model
        gc.collect()
        torch.set_num_threads(1)  # as the Runtime's router expects


def open_peer(name: str, bundles: dict[str, Bundle], checkpoint_dir: str, threads: int):
    if name == "torch":
        return TorchPeer(checkpoint_dir, threads)
    return OrtPeer(name, bundles[name], threads)
