"""`mistral-lm finetune`: supervised fine-tuning on chat data, LoRA by default, on a laptop CPU.

The data is JSON lines of conversations (`{"messages": [{"role", "content"}, ...]}`, the format
of OpenAI's and trl's chat datasets), rendered by the model's own chat template with the loss on
assistant tokens only (`training.chat_example`). Three modes:

- LoRA (default): peft adapters on the attention and MLP projections of a float model;
- `qlora`: the same adapters over 4-bit weights (a GGUF's own blocks, or NF4 for float checkpoints),
  the base frozen and quantized;
- `full`: every weight trains, and the whole model is saved.

Every `save_every` steps a checkpoint folder (`checkpoint-<step>`) holds the adapter (or model),
the optimizer state and the data position, so `resume=True` continues where a run stopped; the
optimizer state is read back with `torch.load(weights_only=True)`, which unpickles no code.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, MistralLMError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATE = "trainer_state.json"


class DataError(MistralLMError, ValueError):
    """A line of the training data is not a chat conversation."""


@dataclass
class FinetuneConfig:
    data: str
    out: str
    model: str | None = None
    mode: str = "lora"  # "lora", "qlora" or "full"
    steps: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    max_length: int = 512
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS
    gradient_checkpointing: bool = False
    save_every: int = 50
    resume: bool = False
    skip_bad_lines: bool = False
    eval_data: str | None = None
    seed: int = 0
    log: Any = field(default=sys.stderr, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "qlora", "full"):
            raise ConfigError(f"mode must be lora, qlora or full, got {self.mode!r}")
        for name in ("steps", "batch_size", "max_length", "lora_r", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


# ------------------------------------------------------------------ data
def read_conversations(path: str | Path, *, skip_bad_lines: bool = False,
                       log: Any = sys.stderr) -> list[list[dict[str, Any]]]:
    """The conversations of a JSON-lines file. A line that is not `{"messages": [...]}` (or a bare
    list of messages) with a role and string content in each raises DataError naming the line,
    or, with `skip_bad_lines`, is skipped with a warning naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read the training data {str(path)!r}: {exc.strerror}") from exc
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(_conversation(line))
        except DataError as exc:
            if not skip_bad_lines:
                raise DataError(f"{path}:{number}: {exc} (pass --skip-bad-lines to skip such lines)") from None
            print(f"warning: {path}:{number} skipped: {exc}", file=log)
    if not out:
        raise DataError(f"{path} holds no conversations")
    return out


def _conversation(line: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    messages = value.get("messages") if isinstance(value, dict) else value
    if not isinstance(messages, list) or not messages:
        raise DataError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"messages[{k}] must be an object with a string role and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant message: nothing to learn from")
    return messages


def examples(tokenizer: Any, conversations: list[list[dict[str, Any]]], max_length: int,
             log: Any = sys.stderr) -> list[dict[str, list[int]]]:
    """`training.chat_example` of each conversation; longer ones than `max_length` are left out
    (never cut: a cut would train on a reply without its end) and counted in a warning."""
    from .training import chat_example

    out = [chat_example(tokenizer, c) for c in conversations]
    kept = [e for e in out if len(e["input_ids"]) <= max_length]
    if len(kept) < len(out):
        print(f"warning: {len(out) - len(kept)} of {len(out)} conversations are longer than --max-length "
              f"{max_length} tokens and were left out", file=log)
    if not kept:
        raise DataError(f"every conversation is longer than --max-length {max_length} tokens")
    return kept


def batches(items: list[dict[str, list[int]]], batch_size: int, seed: int, start: int = 0
            ) -> Iterator[list[dict[str, list[int]]]]:
    """Endless shuffled batches (one new order per pass, from `seed`), from batch number `start`."""
    per_pass = math.ceil(len(items) / batch_size)
    k = start
    while True:
        order = list(range(len(items)))
        random.Random(seed + k // per_pass).shuffle(order)
        offset = (k % per_pass) * batch_size
        yield [items[i] for i in order[offset: offset + batch_size]]
        k += 1


# ------------------------------------------------------------------ model
def load_model(config: FinetuneConfig) -> tuple[Any, Any]:
    """(trainable model, tokenizer): float weights for LoRA and full, 4-bit ones for QLoRA."""
    from .modeling import MistralForCausalLM
    from .runtime import load_options, resolve_model_path
    from .tokenizer import MistralTokenizer

    path = resolve_model_path(config.model)
    if config.mode == "qlora":
        options = load_options(path, "gguf" if path.suffix == ".gguf" else "nf4")
    else:
        options = load_options(path, "none")
    model = MistralForCausalLM.from_pretrained(path, torch_dtype="float32", **options)
    tokenizer = MistralTokenizer.from_pretrained(path)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.mode == "full":
        model.requires_grad_(True)
        return model, tokenizer
    try:
        import peft
    except ImportError as exc:
        raise MistralLMError('LoRA and QLoRA need peft: pip install "mistral_lm[train]"') from exc
    from .training import register_lora_layers

    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                           target_modules=list(config.targets))
    if config.mode == "qlora":
        register_lora_layers(lora)
    return peft.get_peft_model(model, lora), tokenizer


def mean_loss(model: Any, items: list[dict[str, list[int]]], pad_token_id: int, batch_size: int) -> float:
    """The loss per assistant token over `items` (no gradients)."""
    from .training import pad_batch

    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = pad_batch(items[i: i + batch_size], pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


# ------------------------------------------------------------------ the loop
def finetune(config: FinetuneConfig) -> dict[str, float]:
    """Train, checkpointing every `save_every` steps; returns the losses (train, and eval before/after)."""
    from tqdm import tqdm

    from .training import pad_batch

    torch.manual_seed(config.seed)
    out = Path(config.out)
    model, tokenizer = load_model(config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    train = examples(tokenizer, read_conversations(config.data, skip_bad_lines=config.skip_bad_lines,
                                                   log=config.log), config.max_length, config.log)
    held_out = (examples(tokenizer, read_conversations(config.eval_data, log=config.log), config.max_length,
                         config.log) if config.eval_data else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MistralLMError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    step = _resume(out, model, optimizer, config) if config.resume else 0
    results: dict[str, float] = {}
    if held_out is not None:
        results["eval_loss_before"] = mean_loss(model, held_out, pad, config.batch_size)
    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="finetune", unit="step", file=config.log,
                    dynamic_ncols=True)
    data = batches(train, config.batch_size, config.seed, start=step)
    started, tokens, loss_value = time.perf_counter(), 0, float("nan")
    while step < config.steps:
        batch = pad_batch(next(data), pad)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int(batch["attention_mask"].sum())
        loss_value = float(loss.detach())
        progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        progress.update(1)
        if step % config.save_every == 0 or step == config.steps:
            _save(out / f"checkpoint-{step}", model, tokenizer, optimizer, step, config)
    progress.close()
    _save_final(out, model, tokenizer, config)
    results["train_loss_last"] = loss_value
    if held_out is not None:
        results["eval_loss_after"] = mean_loss(model, held_out, pad, config.batch_size)
    return results


def _save_final(folder: Path, model: Any, tokenizer: Any, config: FinetuneConfig) -> None:
    model.save_pretrained(folder)
    if config.mode == "full":
        tokenizer.save_pretrained(folder)


def _save(folder: Path, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer, step: int,
          config: FinetuneConfig) -> None:
    _save_final(folder, model, tokenizer, config)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / STATE).write_text(json.dumps({"step": step, "mode": config.mode, "seed": config.seed,
                                            "batch_size": config.batch_size}) + "\n")


def _resume(out: Path, model: Any, optimizer: torch.optim.Optimizer, config: FinetuneConfig) -> int:
    """Load the latest `checkpoint-<step>` under `out` (weights, optimizer, step); 0 when none."""
    found = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / STATE).is_file())
    if not found:
        print(f"no checkpoint under {out}: starting from step 0", file=config.log)
        return 0
    step, folder = found[-1]
    state = json.loads((folder / STATE).read_text())
    if (state.get("mode"), state.get("seed"), state.get("batch_size")) != (config.mode, config.seed,
                                                                            config.batch_size):
        raise ConfigError(f"{folder} was written with mode/seed/batch size {state.get('mode')}/{state.get('seed')}/"
                          f"{state.get('batch_size')}; resume with the same settings")
    if config.mode == "full":
        from safetensors.torch import load_file

        weights = {}
        for file in sorted(folder.glob("*.safetensors")):
            weights |= load_file(str(file))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise MistralLMError(f"{folder} does not match the model (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    print(f"resumed from {folder} (step {step})", file=config.log)
    return step
