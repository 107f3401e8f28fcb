"""Tensor parallel on torch.distributed: a pure plan (plan.py), applied to a model (apply.py),
loaded slice by slice from safetensors (loader.py), in a process group started from torchrun's
environment with bounded timeouts (process.py).

    torchrun --nproc-per-node 2 script.py
        model = parallel.from_pretrained("path/to/hf-folder")      # this rank's shard
        out = generate(model, ids, max_new_tokens=32)              # every rank runs the same call
        torch.distributed.destroy_process_group()                  # a clean exit

    two machines, one process each (tests/test_parallel.py runs this on loopback):
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
             --rdzv-id JOB script.py                                # on each machine

Every rank must run the same forward calls with the same inputs (the all-reduces pair up in
order); the sums are identical on every rank, so the ranks' logits agree bit for bit and greedy
or equally seeded sampling picks the same tokens everywhere; rank 0's result is every rank's.
"""

from __future__ import annotations

from .apply import CollectiveStats, TensorParallel, shard_model
from .loader import from_pretrained
from .plan import Split, TensorParallelPlan, plan_tensor_parallel
from .process import (DEFAULT_TIMEOUT_S, DistributedContext, DistributedError, check_same_everywhere,
                      checkpoint_fingerprint, init_distributed)
from .quantize import quantize_sharded, shard_gguf_blocks
from .reader import read_shard

__all__ = [
    "DEFAULT_TIMEOUT_S", "CollectiveStats", "DistributedContext", "DistributedError", "Split", "TensorParallel",
    "TensorParallelPlan", "check_same_everywhere", "checkpoint_fingerprint", "from_pretrained", "init_distributed",
    "plan_tensor_parallel", "quantize_sharded", "read_shard", "shard_gguf_blocks", "shard_model",
]
