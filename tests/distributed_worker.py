"""exp6_trainer.main with a fault injected on one rank, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker RANK RUN FAULT [exp6_trainer options]

On rank RANK, the RUN-th deepseek model that rank trains (1-based) meets FAULT at its 5th training
forward pass (step 3, after the untimed warm-up pass): `raise` raises RuntimeError("injected fault"),
`sigterm` sends the process SIGTERM, as a scheduler killing one rank would, `sigkill` SIGKILL (the
out-of-memory killer: no chance to say anything), and `nan` returns NaN logits (that rank's loss goes
non-finite). Every other run is untouched. FAULT `flags:OPTIONS` instead starts rank RANK with OPTIONS
appended to its command line (RUN is ignored): ranks started with different flags.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

from arms.registry import arm_builders
from exp6_flash_attention_model import FlashAttentionModel
from exp6_trainer import main
from models.attention import KVCache

FAULT = "injected fault"


class FailsOnOneRank(FlashAttentionModel):
    """The MLA model; its `fail_run`-th instance on rank `fail_rank` raises mid-training."""

    fail_rank, fail_run, fault, built = -1, 1, "raise", 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faulty, self.calls = False, 0
        if self.embed.weight.is_meta:  # the memory plan's shapes, not a model that trains
            return
        FailsOnOneRank.built += 1
        self.faulty = int(os.environ.get("RANK", "0")) == self.fail_rank and FailsOnOneRank.built == self.fail_run

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.faulty:
            self.calls += 1
            if self.calls == 5 and self.fault == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the experiment's handler raises RunTerminated right here
            elif self.calls == 5 and self.fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.calls == 5 and self.fault == "nan":
                logits, aux = super().forward(input_ids, caches, last_only)
                return logits * float("nan"), aux
            elif self.calls == 5:
                raise RuntimeError(FAULT)
        return super().forward(input_ids, caches, last_only)


if __name__ == "__main__":
    FailsOnOneRank.fail_rank, FailsOnOneRank.fail_run, FailsOnOneRank.fault = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    argv = sys.argv[4:]
    if FailsOnOneRank.fault.startswith("flags:") and int(os.environ.get("RANK", "0")) == FailsOnOneRank.fail_rank:
        argv += FailsOnOneRank.fault.removeprefix("flags:").split()
    sys.exit(main(argv, builders={**arm_builders(), "deepseek": FailsOnOneRank}))
