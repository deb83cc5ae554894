"""exp6_trainer.main with a fault injected on one rank, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker RANK RUN [exp6_trainer options]

On rank RANK, the RUN-th deepseek model that rank trains (1-based) raises RuntimeError("injected fault")
at its 5th training forward pass (step 3, after the untimed warm-up pass); every other run is untouched.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from exp6_flash_attention_model import FlashAttentionModel
from exp6_trainer import main
from models.attention import KVCache
from training.experiment import MODEL_BUILDERS

FAULT = "injected fault"


class FailsOnOneRank(FlashAttentionModel):
    """The MLA model; its `fail_run`-th instance on rank `fail_rank` raises mid-training."""

    fail_rank, fail_run, built = -1, 1, 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        FailsOnOneRank.built += 1
        self.faulty = int(os.environ.get("RANK", "0")) == self.fail_rank and FailsOnOneRank.built == self.fail_run
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.faulty:
            self.calls += 1
            if self.calls == 5:
                raise RuntimeError(FAULT)
        return super().forward(input_ids, caches, last_only)


if __name__ == "__main__":
    FailsOnOneRank.fail_rank, FailsOnOneRank.fail_run = int(sys.argv[1]), int(sys.argv[2])
    sys.exit(main(sys.argv[3:], builders={**MODEL_BUILDERS, "deepseek": FailsOnOneRank}))
