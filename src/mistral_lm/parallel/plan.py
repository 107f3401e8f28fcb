"""Which rows or columns of each weight a tensor-parallel rank holds: pure, validated, no I/O.

Notation: N ranks, H query heads, H_kv key/value heads, D head_dim, C hidden_size,
I intermediate_size.

Megatron's split of a decoder layer, as gpt-fast's tp.py and vLLM apply it:

    q_proj, k_proj, v_proj   column-parallel: rank r holds whole heads (rows of the weight)
    o_proj                   row-parallel: the matching input columns; partial sums, one all-reduce
    gate_proj, up_proj       column-parallel: rows [r*I/N, (r+1)*I/N)
    down_proj                row-parallel: the matching columns; one all-reduce
    embeddings, norms, heads replicated; or, with `vocab_parallel=True`, embed_tokens and lm_head
                             split by vocabulary rows [r*V/N, (r+1)*V/N): the embedding lookup
                             is summed (all-reduce), the logits gathered (all-gather)

Attention is split by key/value-head groups: query head h reads kv head h // (H / H_kv)
(Transformers' repeat_kv), so rank r's query heads [r*H/N, (r+1)*H/N) read exactly kv heads
[r*H_kv/N, (r+1)*H_kv/N) and no rank needs another's keys. Worked example, H=32, H_kv=8, N=4:
rank 1 holds query heads 8-15 and kv heads 2-3, i.e. q_proj rows 8*D..16*D, k/v rows 2*D..4*D.

When N > H_kv (e.g. MQA, H_kv=1) and N is a multiple of H_kv, every kv head is replicated on
the N / H_kv ranks whose query heads read it (vLLM does the same): those ranks compute and cache
the same keys, which costs k/v projections and cache memory, not correctness. Any other ratio
is refused before a tensor is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..config import MistralConfig
from ..errors import ConfigError

# weight name suffix -> dimension split (0: rows, i.e. output features; 1: columns, input features)
_COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
ROW_PARALLEL_MODULES = _ROW_PARALLEL  # their outputs are partial sums: all-reduced


@dataclass(frozen=True)
class Split:
    """The part of one tensor a rank holds: `tensor.narrow(dim, start, stop - start)`; dim None
    means the whole tensor (replicated)."""

    dim: int | None
    start: int = 0
    stop: int = 0

    def apply(self, tensor):  # type: ignore[no-untyped-def]
        return tensor if self.dim is None else tensor.narrow(self.dim, self.start, self.stop - self.start)


REPLICATED = Split(None)


@dataclass(frozen=True)
class TensorParallelPlan:
    """Rank `rank` of `world_size`: its query heads, kv heads and feed-forward rows."""

    world_size: int
    rank: int
    head_dim: int
    q_heads: range  # query heads held
    kv_heads: range  # key/value heads held (replicated on several ranks when N > H_kv)
    ffn_rows: range  # rows of gate/up, columns of down
    kv_replicas: int = 1  # ranks holding each kv head: 1 when kv heads are split, N / H_kv otherwise
    vocab_rows: range | None = None  # rows of embed_tokens / lm_head held; None: replicated

    def split(self, name: str) -> Split:
        """The slice of the tensor named `name` (a Transformers state-dict key, with or without
        the `model.` prefix, `.weight`, `.bias` or a quantized module's portable names) this rank holds."""
        module, _, leaf = name.rpartition(".")
        d = self.head_dim
        if module.endswith("self_attn.q_proj"):
            return Split(0, self.q_heads.start * d, self.q_heads.stop * d)
        if module.endswith(("self_attn.k_proj", "self_attn.v_proj")):
            return Split(0, self.kv_heads.start * d, self.kv_heads.stop * d)
        if module.endswith(("mlp.gate_proj", "mlp.up_proj")):
            return Split(0, self.ffn_rows.start, self.ffn_rows.stop)
        if self.vocab_rows is not None and module.endswith(("embed_tokens", "lm_head")):
            return Split(0, self.vocab_rows.start, self.vocab_rows.stop)
        if module.endswith(_ROW_PARALLEL):
            if leaf != "weight":
                raise ConfigError(f"{name}: only the float weight of a row-parallel Linear can be sharded "
                                  "(a bias would be added N times; quantized row-parallel layers are "
                                  "quantized after sharding, see parallel.apply)")
            if module.endswith("o_proj"):
                return Split(1, self.q_heads.start * d, self.q_heads.stop * d)
            return Split(1, self.ffn_rows.start, self.ffn_rows.stop)
        return REPLICATED

    def rank_config(self, config: MistralConfig) -> MistralConfig:
        """A copy of `config` describing this rank's modules: its head counts and feed-forward
        width, head_dim explicit, so `make_cache` sizes the rank's own (B, H_kv/N, S, D) cache."""
        local = copy.deepcopy(config)
        local.num_attention_heads = len(self.q_heads)
        local.num_key_value_heads = len(self.kv_heads)
        local.intermediate_size = len(self.ffn_rows)
        local.head_dim = self.head_dim
        local.validate()
        return local

    def describe(self) -> str:
        vocab = "replicated" if self.vocab_rows is None else f"{self.vocab_rows.start}-{self.vocab_rows.stop - 1}"
        return (f"rank {self.rank}/{self.world_size}: query heads {self.q_heads.start}-{self.q_heads.stop - 1}, "
                f"kv heads {self.kv_heads.start}-{self.kv_heads.stop - 1}, "
                f"ffn rows {self.ffn_rows.start}-{self.ffn_rows.stop - 1}, vocab rows {vocab}")


def plan_tensor_parallel(config: MistralConfig, world_size: int, rank: int,
                         vocab_parallel: bool = False) -> TensorParallelPlan:
    """Rank `rank`'s share of a model with `config` over `world_size` ranks; ConfigError naming
    the numbers when the heads, the feed-forward width or (vocab_parallel) the vocabulary do not
    divide."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"tp_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}")
    n, h, h_kv, inter = world_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if h % n:
        raise ConfigError(f"tensor parallel over {n} ranks needs num_attention_heads ({h}) divisible by {n}; "
                          f"use a tp_size that divides {h}")
    if h_kv % n and n % h_kv:
        raise ConfigError(f"tensor parallel over {n} ranks needs num_key_value_heads ({h_kv}) divisible by {n} "
                          f"(kv heads split) or {n} divisible by {h_kv} (kv heads replicated); "
                          f"use a tp_size that divides {h_kv} or is a multiple of it")
    if inter % n:
        raise ConfigError(f"tensor parallel over {n} ranks needs intermediate_size ({inter}) divisible by {n}")
    vocab = config.vocab_size
    if vocab_parallel and vocab % n:
        raise ConfigError(f"vocab_parallel over {n} ranks needs vocab_size ({vocab}) divisible by {n}; "
                          "use vocab_parallel=False (replicated embeddings and head)")
    v_per = vocab // n
    q_per = h // n
    if h_kv >= n:
        kv_per = h_kv // n
        kv = range(rank * kv_per, (rank + 1) * kv_per)
    else:  # each kv head replicated on n / h_kv ranks: the one this rank's query heads read
        group = h // h_kv  # query heads per kv head
        first = (rank * q_per) // group
        kv = range(first, first + 1)
    f_per = inter // n
    return TensorParallelPlan(n, rank, config.head_dim, range(rank * q_per, (rank + 1) * q_per), kv,
                              range(rank * f_per, (rank + 1) * f_per), max(1, n // h_kv),
                              range(rank * v_per, (rank + 1) * v_per) if vocab_parallel else None)
