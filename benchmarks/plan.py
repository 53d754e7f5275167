"""How much of each workload a run does: the full run, or the --quick smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    w1_texts: int | None  # None: the whole multilingual set
    w1_reps: dict[str, int]
    w1_budget_s: float
    w2_shape: tuple[int, int]
    w2_reps: dict[str, int]
    w2_budget_s: float
    w3_texts: int
    w3_max_tokens: int
    w3_batch_tokens: int
    w3_reps: dict[str, int]
    w3_budget_s: float
    w4_clients: tuple[int, ...]
    w4_warmup_s: float
    w4_duration_s: float
    w4_inprocess_reps: int
    w4_overhead_rounds: int  # rounds of an in-process block and a service block
    w5_requests: int
    w5_window: int
    bandwidth_gib: float


FULL = Plan(
    w1_texts=None, w1_reps={"routed": 5, "all-experts": 5, "torch": 3, "service": 5,
                            "llama.cpp": 5},
    w1_budget_s=30,
    w2_shape=(32, 128), w2_reps={"routed": 3, "all-experts": 2, "torch": 2, "llama.cpp": 2},
    w2_budget_s=60,
    w3_texts=256, w3_max_tokens=512, w3_batch_tokens=8192,
    w3_reps={"routed": 3, "all-experts": 1, "torch": 1, "service": 2, "service-2x1": 1,
             "llama.cpp": 1},
    w3_budget_s=120,
    w4_clients=(1, 8, 32), w4_warmup_s=2.0, w4_duration_s=10.0, w4_inprocess_reps=5,
    w4_overhead_rounds=12,
    w5_requests=2000, w5_window=32, bandwidth_gib=1.0,
)

QUICK = Plan(
    w1_texts=8, w1_reps={"routed": 2, "all-experts": 2, "torch": 1, "service": 2,
                         "llama.cpp": 2},
    w1_budget_s=8,
    w2_shape=(4, 128), w2_reps={"routed": 1, "all-experts": 1, "torch": 1, "llama.cpp": 1},
    w2_budget_s=10,
    w3_texts=8, w3_max_tokens=256, w3_batch_tokens=8192,
    w3_reps={"routed": 1, "all-experts": 1, "torch": 1, "service": 1, "service-2x1": 1,
             "llama.cpp": 1},
    w3_budget_s=20,
    w4_clients=(1, 8, 32), w4_warmup_s=1.0, w4_duration_s=2.0, w4_inprocess_reps=2,
    w4_overhead_rounds=2,
    w5_requests=100, w5_window=32, bandwidth_gib=0.5,
)
