"""The in-process peers, each behind `run(ids) -> expert_tokens | None`.

- routed: moe-embed's runtime (dense ONNX segments, torch router, one session per expert)
- all-experts: the single ONNX graph that computes all 8 experts for every token and masks
- torch: the PyTorch eager reference (upstream per-expert loop), with the same thread count
- llama.cpp: llama.cpp's nomic-bert-moe on the F32 GGUF of the same checkpoint (optional:
  `make llama-peer` installs it; llama.cpp drops the experts' output bias, which costs nothing
  measurable in time)
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np
import torch

from moe_embed.workers.bundle.format import Bundle
from moe_embed.workers.runtime.runtime import Runtime, pack

PEERS = ("routed", "all-experts", "torch", "llama.cpp")


def llama_available() -> str | None:
    """None if the llama.cpp peer can run here, else why not."""
    try:
        from llama_peer.provision import check_installed

        check_installed()
    except Exception as exc:  # not installed, or built for another CPU
        return f"{exc} (run `make llama-peer`)"
    return None


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


class LlamaCppPeer:
    """llama.cpp on the F32 GGUF of the checkpoint (made once by llama.cpp's converter)."""

    name = "llama.cpp"

    def __init__(self, checkpoint_dir: str, threads: int) -> None:
        from pathlib import Path

        from llama_peer.ggufs import make_ggufs
        from llama_peer.peer import LlamaPeer

        gguf = make_ggufs(Path(checkpoint_dir), types=("F32",))["F32"]
        self.peer = LlamaPeer(gguf, threads)

    def run(self, ids: Sequence[Sequence[int]]) -> None:
        self.peer.run([list(x) for x in ids])
        return None

    def close(self) -> None:
        self.peer.close()
        gc.collect()


def open_peer(name: str, bundles: dict[str, Bundle], checkpoint_dir: str, threads: int):
    if name == "torch":
        return TorchPeer(checkpoint_dir, threads)
    if name == "llama.cpp":
        return LlamaCppPeer(checkpoint_dir, threads)
    return OrtPeer(name, bundles[name], threads)
