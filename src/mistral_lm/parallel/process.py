"""The process group: started from torchrun's environment, bounded in time, failing loudly.

`torchrun --nproc-per-node N script.py` (or `--nnodes`, `--rdzv-endpoint` across machines)
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them,
picks gloo on CPU or NCCL on the GPU of LOCAL_RANK, and sets the collective timeout.

How a failure reaches the other ranks, measured with gloo on loopback (tests/test_parallel.py):
- a rank that dies (an exception that ends its process, a kill) closes its sockets: the others'
  next collective fails at once with "Connection closed by peer";
- a rank that hangs (alive, never joining the collective) is noticed when the collective
  timeout `timeout_s` passes.
Either way the error surfaces as `DistributedError` from the all-reduce that failed, naming the
rank and the layer, and the process exits non-zero unless the caller catches it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CheckpointError, ConfigError, DistributedError

DEFAULT_TIMEOUT_S = 120.0  # a hung peer is reported after this; a dead one at once
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join (or reuse) the default process group from torchrun's environment variables.

    `backend` None: "nccl" when CUDA is available (device cuda:LOCAL_RANK), else "gloo" on the
    CPU. `timeout_s` bounds every collective, start-up included: a rank that never arrives
    makes the others fail after it instead of waiting forever.
    """
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return _context(dist.get_backend(), timeout_s)
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(f"tensor parallel needs the process group's environment, missing {missing}: "
                          "launch with `torchrun --nproc-per-node N ...` (which sets RANK, WORLD_SIZE, "
                          "LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    options: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        options["device_id"] = torch.device("cuda", local_rank)  # binds the communicator eagerly
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **options)
    except (RuntimeError, ValueError, TimeoutError) as exc:
        raise DistributedError(f"could not join the process group at {os.environ['MASTER_ADDR']}:"
                               f"{os.environ['MASTER_PORT']} as rank {os.environ['RANK']} of "
                               f"{os.environ['WORLD_SIZE']} within {timeout_s:g}s: {exc}") from exc
    return _context(backend, timeout_s)


def _context(backend: str, timeout_s: float) -> DistributedContext:
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, timeout_s)


def all_reduce_(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """Sum `tensor` over the default group, in place; a failure names this rank and `where`."""
    try:
        dist.all_reduce(tensor)
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError (DistBackendError) subclasses
        raise DistributedError(
            f"rank {dist.get_rank()}/{dist.get_world_size()}: the all-reduce after {where} failed: a peer "
            f"rank crashed, hung past the collective timeout, or left the group. Check the other ranks' "
            f"logs for the first error. ({exc})") from exc
    return tensor


def all_gather_last(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """Every rank's `tensor`, concatenated along the last dimension in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(parts, tensor)
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {dist.get_rank()}/{dist.get_world_size()}: the all-gather after {where} failed: a peer "
            f"rank crashed, hung past the collective timeout, or left the group ({exc})") from exc
    return torch.cat(parts, dim=-1)


def checkpoint_fingerprint(source: str | os.PathLike, weight_files: list[Path], options: dict[str, Any]) -> str:
    """A short hash of what a rank is about to load: config.json (for a folder), each weight
    file's name, size and header (safetensors: names, dtypes, shapes, offsets; GGUF: its first
    MiB, metadata and tensor table), and the load options. Costs kilobytes, not the weights."""
    digest = hashlib.sha256()
    config = Path(source) / "config.json"
    if config.is_file():
        digest.update(json.dumps(json.loads(config.read_text(encoding="utf-8")), sort_keys=True).encode())
    for file in weight_files:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as handle:
            if file.suffix == ".safetensors":
                size = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(size, 100_000_000)))
            else:
                digest.update(handle.read(1 << 20))
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def check_same_everywhere(fingerprint: str, label: str, what: str) -> None:
    """All-gather (`fingerprint`, `label`); CheckpointError on every rank if any fingerprint
    differs, naming which ranks saw what (`label`: e.g. the path, which may differ between nodes
    without the checkpoint differing). Every rank raises the same error, so none is left waiting."""
    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, (fingerprint, label))
    except RuntimeError as exc:
        raise DistributedError(f"rank {dist.get_rank()}: comparing {what} across ranks failed "
                               f"(a peer rank crashed or hung): {exc}") from exc
    if len({seen for seen, _ in gathered}) > 1:
        groups: dict[tuple[str, str], list[int]] = {}
        for rank, seen in enumerate(gathered):
            groups.setdefault(tuple(seen), []).append(rank)
        detail = "; ".join(f"ranks {ranks} load {label} (fingerprint {seen})"
                           for (seen, label), ranks in groups.items())
        raise CheckpointError(f"{what} differs across ranks: {detail}. Every rank must load the same "
                              "checkpoint (config.json, weight files) with the same options")
