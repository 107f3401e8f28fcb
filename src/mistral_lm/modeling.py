"""The Mistral decoder in plain PyTorch, with Hugging Face module names.

Notation: B batch, T new tokens this step, K keys attended, H query heads, H_kv key/value
heads, D head_dim, C hidden_size, V vocab_size.

Attribute names equal Transformers' state-dict keys (`model.layers.0.self_attn.q_proj.weight`),
so `load_state_dict(strict=True)` is the whole checkpoint story.

Float32 islands, each for a reason:
- RMSNorm statistics: a mean of squares over C values overflows or loses precision in fp16.
- RoPE angles and rotation (rope.py): position * frequency needs more than fp16's 11 bits.
- Softmax in the eager path: scores of 4096 keys sum badly in half precision.
- The loss: cross-entropy over V logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import fused_step, rope
from ._util import Output
from .attention import ATTENTION_FUNCTIONS
from .cache import CachePlan, KVCache
from .config import MistralConfig
from .errors import InputError
from .fusion import end_fusions, exact_fusions, fused_module, mark_stale
from .masks import attention_mask as build_mask
from .masks import positions_from_padding
from .native import attention as native
from .pretrained import MistralPreTrainedModel

_ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# --------------------------------------------------------------------------- outputs
@dataclass
class BaseModelOutputWithPast(Output):
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(Output):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(Output):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------- step facts
@dataclass(frozen=True)
class Step:
    """What every layer of one forward step reads, computed once by `make_step`."""

    cos: torch.Tensor  # (B, T, D) float32
    sin: torch.Tensor  # (B, T, D) float32, signs folded in for rope.rotate
    mask: torch.Tensor | None  # (B, 1, T, K) True where attention is allowed; None: plain causal
    causal: bool  # the keys are this step's own tokens, in order, unpadded: mask = causal and window
    window: int | None  # the sliding window, for kernels that take it instead of a mask
    plan: CachePlan | None  # what the cache does this step (None without a cache)
    attn_implementation: str


def make_step(config: MistralConfig, positions: torch.Tensor, valid: torch.Tensor, cache: KVCache | None,
              attn_implementation: str, positions_given: bool = False) -> Step:
    """Step facts for T new tokens at absolute `positions` (B, T); `valid` (B, T) is False for padding.

    A first step without padding whose keys are its own tokens is plain causal attention: the
    mask is left out (None) when the window covers every query, so SDPA's `is_causal` skips the
    masked half and no (T, T) mask is built.
    """
    t = positions.shape[1]
    plan = cache.plan(positions, valid) if cache is not None else None
    k_pos, k_valid = (plan.key_positions, plan.key_valid) if plan is not None else (positions, valid)
    window = config.sliding_window
    causal = (t > 1 and not positions_given and (cache is None or cache.get_seq_length() == 0)
              and k_pos.shape[1] == t and bool(valid.all()))
    mask = None if causal and (window is None or window >= t) else build_mask(positions, k_pos, k_valid, window)
    cos, sin = rope.step_tables(positions, config.head_dim, config.rope_theta)
    return Step(cos, sin, mask, causal, window, plan, attn_implementation)


# --------------------------------------------------------------------------- layers
class MistralRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.supports(x, self.weight) or native.supports_bf16(x, self.weight):
            # the same expression, each row summed in one fixed order: batch-invariant
            return native.rmsnorm(x, self.weight, self.variance_epsilon)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class _Fusable(nn.Module):
    """A parent of projections that fusion.py may fuse: a move or cast releases the fused copy's
    reader (fused again from the parts on the next inference call)."""

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        mark_stale(self)
        return super()._apply(fn, recurse)


class MistralMLP(_Fusable):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_module(self, "gate_up_proj")  # fusion.py: for inference, when exact
        if gate_up is not None:
            gate, up = gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act_fn is F.silu and (native.supports(gate, up) or native.supports_bf16(gate, up)):
            return self.down_proj(native.silu_mul(gate, up))  # the bits the fused decode step computes
        return self.down_proj(self.act_fn(gate) * up)


class MistralAttention(_Fusable):
    def __init__(self, config: MistralConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        c, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(c, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(c, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(c, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, c, bias=False)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, _ = x.shape
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = step.cos[:, :, None], step.sin[:, :, None]
        qkv = fused_module(self, "qkv_proj")  # fusion.py: one matmul, q and k rotated together
        if qkv is not None:
            qk, v = qkv(x).split([(h + h_kv) * d, h_kv * d], dim=-1)
            q, k = rope.rotate(qk.view(b, t, h + h_kv, d), cos, sin).split([h, h_kv], dim=2)
        else:
            q = rope.rotate(self.q_proj(x).view(b, t, h, d), cos, sin)
            k = rope.rotate(self.k_proj(x).view(b, t, h_kv, d), cos, sin)
            v = self.v_proj(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, h_kv, d).transpose(1, 2)  # (B, H, T, D)
        if cache is not None and step.plan is not None:
            k, v = cache.update(self.layer_idx, k, v, step.plan)  # (B, H_kv, K, D)
        attend = ATTENTION_FUNCTIONS[step.attn_implementation]
        out, weights = attend(q, k, v, step.mask, self.scaling, self.config.attention_dropout, self.training,
                              causal=step.causal, window=step.window)
        return self.o_proj(out.reshape(b, t, -1)), weights  # out: (B, T, H, D)


class MistralDecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MistralAttention(config, layer_idx)
        self.mlp = MistralMLP(config)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h: torch.Tensor, step: Step, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.self_attn(self.input_layernorm(h), step, cache)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), weights


# the classes whose computation fused_step.py's native step reproduces
_STOCK_LAYER = (MistralDecoderLayer, MistralAttention, MistralMLP, MistralRMSNorm)


# --------------------------------------------------------------------------- models
class MistralModel(MistralPreTrainedModel):
    """The decoder stack: embeddings, layers, final norm. Returns hidden states."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing: dict[str, Any] | None = None  # set by activation_checkpointing_enable
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def make_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """A cache for `batch_size` rows: `sliding_window` slots, or `max_length` without a window."""
        cfg = self.config
        rolling = cfg.sliding_window is not None and (max_length is None or max_length > cfg.sliding_window)
        size = cfg.sliding_window if rolling else (max_length or min(cfg.max_position_embeddings, 256))
        devices = [layer.input_layernorm.weight.device for layer in self.layers]
        dtype = getattr(self.embed_tokens, "output_dtype", None) or self.embed_tokens.weight.dtype  # a block table's
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32
        dtype = self.kv_cache_dtype or dtype
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, size,
                       rolling=rolling, dtype=dtype, device=devices)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = (past_key_values is not None or (cfg.use_cache and not self.training)) if use_cache is None else use_cache
        if use_cache and self._checkpointing():
            if past_key_values is not None:
                raise InputError("gradient checkpointing recomputes layers, which would write the KV cache twice: "
                                 "pass no past_key_values in training, or call gradient_checkpointing_disable()")
            use_cache = False  # as Transformers does: no cache while checkpointing
        h = self._embed(input_ids, inputs_embeds)
        cache = self._cache_for(past_key_values, use_cache, h.shape[0])
        step = self.prepare_step(h, attention_mask, position_ids, cache, "eager" if output_attentions else None)
        hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        attentions: list[torch.Tensor] | None = [] if output_attentions else None
        h = self.decode_layers(h, step, cache, hidden, attentions)
        if cache is not None and step.plan is not None:
            cache.commit(step.plan)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=cache if use_cache else None,
            hidden_states=None if hidden is None else tuple(hidden),
            attentions=None if attentions is None else tuple(attentions),
        )

    def prepare_step(self, h: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     cache: KVCache | None, attn_implementation: str | None = None) -> Step:
        """The facts every layer of this step reads, computed once; the cache is not changed."""
        b, t, _ = h.shape
        past = cache.get_seq_length() if cache is not None else 0
        valid = self._new_token_validity(attention_mask, b, t, past, h.device)
        given = position_ids is not None
        if position_ids is None:
            position_ids = self._positions(attention_mask, b, t, past, h.device)
        elif position_ids.shape[-1] != t:
            raise InputError(f"position_ids has length {position_ids.shape[-1]}, but the input has {t} tokens")
        return make_step(self.config, position_ids.to(h.device).expand(b, t), valid, cache,
                         attn_implementation or self.attn_implementation, positions_given=given)

    def decode_layers(self, h: torch.Tensor, step: Step, cache: KVCache | None,
                      hidden: list[torch.Tensor] | None = None,
                      attentions: list[torch.Tensor] | None = None, fused: bool = True) -> torch.Tensor:
        """Every layer, then the final norm, collecting per-layer outputs into the lists given.
        A driver may compile it for single-token steps (generation.py). `fused=False`: the caller
        already asked the native step for this very step and was refused."""
        if fused and hidden is None and attentions is None:
            # all layers in one native call, computing the same bits as the modules below
            native = fused_step.decode_layers(self, h, step, cache, _STOCK_LAYER)
            if native is not None:  # the final norm included
                return native
        every = self.gradient_checkpointing["every_n_layers"] if cache is None and self._checkpointing() else 0
        # fusion.py: the fused projections that are exact right now, validated once for the step
        compiling = torch.compiler.is_compiling()
        previous = None if compiling else exact_fusions(self._fusable_parents())
        try:
            for i, layer in enumerate(self.layers):
                if hidden is not None:
                    hidden.append(h)
                if every and i % every == 0:
                    h, weights = torch.utils.checkpoint.checkpoint(layer, h, step, cache,
                                                                   **self.gradient_checkpointing["kwargs"])
                else:
                    h, weights = layer(h, step, cache)
                if attentions is not None:
                    attentions.append(weights)
        finally:
            if not compiling:
                end_fusions(previous)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        return h

    def fused_step_available(self) -> bool:
        """Whether this decoder's modules are all of the kinds the fused native step computes
        (fused_step.py); a given step may still run the modules (hooks, autograd, many rows)."""
        return fused_step.table_for(self, _STOCK_LAYER) is not None

    def _fusable_parents(self) -> list[nn.Module]:
        """Every layer's attention and MLP, listed once per ModuleList: a module swapped in later
        is simply not validated, so its layer runs the parts."""
        cached = self.__dict__.get("_fusable")
        if cached is None or cached[0] is not self.layers or cached[1] != len(self.layers):
            parents = [m for layer in self.layers for m in (layer.self_attn, layer.mlp)]
            cached = self.__dict__["_fusable"] = (self.layers, len(self.layers), parents)
        return cached[2]

    def _checkpointing(self) -> bool:
        return bool(self.gradient_checkpointing) and self.training and torch.is_grad_enabled()

    def _cache_for(self, past_key_values: Any, use_cache: bool, batch_size: int) -> KVCache | None:
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise InputError(
                f"past_key_values must be the cache returned by this model (a KVCache), "
                f"got {type(past_key_values).__name__}"
            )
        if past_key_values is None and use_cache:
            return self.make_cache(batch_size)
        return past_key_values

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise InputError(
                    f"inputs_embeds must be (batch, seq, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds
        assert input_ids is not None
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")
        table = getattr(self.embed_tokens, "blocks", None)  # a GGUF block table: decoding the weight would copy it
        return self.embed_tokens(input_ids.to((table if table is not None else self.embed_tokens.weight).device))

    @staticmethod
    def _new_token_validity(
        attention_mask: torch.Tensor | None, b: int, t: int, past: int, device: torch.device
    ) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] not in (t, past + t):
            raise InputError(
                f"attention_mask must be (batch={b}, past+new={past + t}) or (batch, new={t}), "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask[:, -t:].to(device=device, dtype=torch.bool)

    @staticmethod
    def _positions(attention_mask: torch.Tensor | None, b: int, t: int, past: int, device: torch.device) -> torch.Tensor:
        if attention_mask is None or attention_mask.shape[1] != past + t:
            return torch.arange(past, past + t, device=device).expand(b, t)
        return positions_from_padding(attention_mask.to(device))[:, -t:]


def _select_last(h: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return h if logits_to_keep == 0 else h[:, -logits_to_keep:]
    return h[:, logits_to_keep]


class MistralForCausalLM(MistralPreTrainedModel):
    """Decoder + language-model head; `generate` comes from MistralPreTrainedModel."""

    _generates = True

    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config)
        self.model = MistralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def make_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """The decoder's cache (MistralModel.make_cache)."""
        return self.model.make_cache(batch_size, max_length)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values: KVCache | None = None,
        attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True, **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward's keywords for one step of a Transformers-style decoding loop (peft's and
        Transformers' generate call this): only the tokens the cache has not seen yet; embeddings
        only on a first step."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs: dict[str, Any] = {"past_key_values": past_key_values, "attention_mask": attention_mask,
                                  "use_cache": use_cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        for key in ("position_ids", "logits_to_keep"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutputWithPast:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states)
        h = _select_last(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)

    def next_token_logits(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """(B, V) logits of one decode step, row i reading tokens[i] at positions[i] into `cache`:
        what `forward(tokens[:, None], position_ids=positions[:, None], past_key_values=cache,
        use_cache=True, logits_to_keep=1).logits[:, -1]` returns, with the head computed inside
        the fused native step where it can be. None, with nothing done, where only the forward
        itself computes that (a hook on this model or its decoder, a forward other than ours,
        per-layer outputs asked for by the config, gradient checkpointing): drivers then call it."""
        decoder = self.model
        cfg = decoder.config
        if (not (_stock_forward(self, MistralForCausalLM) and _stock_forward(decoder, MistralModel))
                or not _plain_call(self, decoder) or cfg.output_attentions or cfg.output_hidden_states
                or decoder._checkpointing() or not isinstance(cache, KVCache)):
            return None
        h = decoder._embed(tokens[:, None], None)
        step = decoder.prepare_step(h, None, positions[:, None], cache)
        fused = fused_step.decode_logits(self, h, step, cache, _STOCK_LAYER)
        if fused is None:
            normed, logits = decoder.decode_layers(h, step, cache, fused=False), None  # refused: asked once
        else:
            normed, logits = fused
        if step.plan is not None:
            cache.commit(step.plan)
        return self.lm_head(normed)[:, -1] if logits is None else logits


def _stock_forward(module: nn.Module, cls: type) -> bool:
    """Whether `module`'s forward is `cls.forward`: not a subclass's, nor one set on the instance."""
    return type(module).forward is cls.forward and "forward" not in module.__dict__


def _plain_call(*modules: nn.Module) -> bool:
    """Whether calling these modules runs just their forward: no hook of theirs, none global."""
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of token i predicting label i+1; label -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shifted = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)


class MistralForSequenceClassification(MistralPreTrainedModel):
    """Scores the last non-pad token of each row with a `score` head of `num_labels` outputs."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MistralModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutputWithPast:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        b = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and b != 1:
            raise InputError("cannot pool a batch of more than one row without config.pad_token_id")
        if pad is None or input_ids is None:
            last = torch.full((b,), logits.shape[1] - 1, device=logits.device)
        else:
            # the rightmost non-pad token handles left and right padding alike
            ids = input_ids if input_ids.dim() == 2 else input_ids[None]
            not_pad = (ids != pad).to(logits.device, torch.long)
            last = (torch.arange(ids.shape[-1], device=logits.device) * not_pad).argmax(-1)
        pooled = logits[torch.arange(b, device=logits.device), last]
        loss = None if labels is None else self._loss(pooled, labels.to(pooled.device))
        return SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem  # as Transformers does: decided once, then fixed
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
            return F.mse_loss(pooled, labels.to(pooled.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))
