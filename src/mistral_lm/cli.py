"""`mistral-lm` command line: a table of subcommands that parse arguments and call the library.

Errors a user can cause (missing or corrupt model file, bad flag values) print one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MistralLMError
from .runtime import QUANTIZE_CHOICES


def load(model_path: str | None, dtype: str | None, quantize: str = "auto",
         kv_cache_dtype: str | None = None) -> tuple[Any, Any]:
    """`runtime.load_for_inference` (the loader `serve` shares), timed on stderr."""
    from .runtime import freeze_imported_objects, load_for_inference, resolve_model_path

    freeze_imported_objects()
    path = resolve_model_path(model_path)
    start = time.perf_counter()
    print(f"loading {path.name} ...", end="", file=sys.stderr, flush=True)
    model, tokenizer = load_for_inference(path, dtype, quantize, kv_cache_dtype)
    print(f" {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
    return model, tokenizer


# Sampling by default, with llama.cpp's `llama-cli` settings (Ollama's temperature too): greedy
# decoding of a small chat model falls into loops (the default model repeats a couplet of the
# README's haiku until the token limit, bench/RESULTS.md), and `--temperature 0` is still greedy.
TEMPERATURE, TOP_K, TOP_P, MIN_P = 0.8, 40, 0.95, 0.05


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    do_sample = args.temperature > 0
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                                  repetition_penalty=args.repetition_penalty, compile=args.compile,
                                  sampler="inverse_cdf")
    if do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      seed=args.seed)
    return kwargs


def _seed_note(args: argparse.Namespace) -> str:
    """A sampling command without `--seed` draws one, once (a chat's turns reuse it), after the
    model has loaded (under torchrun the ranks' group exists then); returns its text for stderr,
    which is how a run is reproduced. Greedy: nothing."""
    if args.temperature <= 0:
        return ""
    if args.seed is None:
        args.seed = _fresh_seed()
    return f"seed {args.seed}"


def _fresh_seed() -> int:
    """A random seed, the same on every rank under torchrun (rank 0's): ranks that sampled
    different tokens would feed their collectives different inputs."""
    import secrets

    import torch.distributed as dist

    seed = torch.tensor([secrets.randbits(31)], dtype=torch.long)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(seed, src=0)
    return int(seed.item())


def _reply(model: Any, tokenizer: Any, ids: torch.Tensor, args: argparse.Namespace) -> tuple[str, int]:
    """Generate, streaming text to stdout as it comes; return the new text and how many tokens
    the model generated (the stop token included). Counting the text's tokens again would not
    be that count: the stop token is not in the text, and a text's tokens need not be the ones
    generated (a random model's pieces, a merge across two tokens)."""
    from .streamers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, streamer=streamer, eos_token_id=_stop_ids(model, tokenizer), **_sampling(args))
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id, model.config.eos_token_id}
    return sorted(i for i in ids if isinstance(i, int))


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]], raw: bool) -> torch.Tensor:
    """The chat prompt as `apply_chat_template` renders it (a tokenizer without a template of its own
    uses the Mistral instruct format, the one `finetune` trains on); `--raw`: the text alone."""
    if raw:
        return tokenizer(messages[-1]["content"], return_tensors="pt")["input_ids"]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model, args.dtype, args.quantize, args.kv_cache_dtype)
    if args.adapter:  # checked against the model before anything loads (training.load_adapter)
        from .training import load_adapter

        model = load_adapter(model, args.adapter).eval()
    ids = _prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}], args.raw)
    seed = _seed_note(args)
    start = time.perf_counter()
    _, n = _reply(model, tokenizer, ids, args)
    elapsed = time.perf_counter() - start
    print(f"\n[{n} tokens in {elapsed:.2f} s{'; ' + seed if seed else ''}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model, args.dtype, args.quantize, args.kv_cache_dtype)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    seed = _seed_note(args)
    print(f"chat: /reset clears the conversation, /exit quits{f' ({seed})' if seed else ''}", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply, _ = _reply(model, tokenizer, _prompt_ids(tokenizer, messages, raw=False), args)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def cmd_info(args: argparse.Namespace) -> int:
    """The config and the parameter count, from the checkpoint's header and a model built on the
    meta device: no weight is read. Loading the weights dequantized a 7B GGUF to 28 GB of float32."""
    from .auto import AutoConfig
    from .loading import build_on_meta
    from .modeling import MistralForCausalLM
    from .runtime import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    print(config.to_json_string(), end="")
    print(f"parameters: {build_on_meta(MistralForCausalLM, config).num_parameters():,}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """GGUF (or any folder we load) -> an HF safetensors folder that transformers loads, or
    (`--layout mistral`) params.json + consolidated*.safetensors as mistral-inference reads."""
    from .runtime import resolve_model_path

    out, source = Path(args.output), resolve_model_path(args.model)
    if source.suffix == ".gguf":
        _convert_gguf(source, out, args.dtype, args.max_shard_size, args.layout)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if _convert_folder(source, out, args.dtype, args.max_shard_size, args.layout):
        print(f"wrote {out}", file=sys.stderr)
        return 0
    model, tokenizer = load(args.model, args.dtype, "none")  # float weights: what a folder holds
    if args.layout == "mistral":
        from .checkpoints.mistral_format import save_mistral_layout

        save_mistral_layout(model.state_dict(), model.config, out, max_shard_size=args.max_shard_size)
    else:
        model.save_pretrained(out, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _convert_gguf(path: Path, out: Path, dtype: str | None, max_shard_size: str, layout: str = "hf") -> None:
    """A GGUF to an HF (or Mistral-layout) folder a shard at a time: each tensor is decoded as its
    shard is written, so memory holds one shard, not the model (a 7B's float32 weights are 29 GB).
    The files are those `save_pretrained` (`save_mistral_layout`) writes of the same file loaded
    in `dtype`."""
    from .checkpoints.gguf import lazy_float_tensors
    from .dtypes import resolve_dtype

    target = resolve_dtype(dtype or "float32")
    config, tensors = lazy_float_tensors(path, target)
    _write_streamed(path, out, config, tensors, target, max_shard_size, layout)


def _convert_folder(folder: Path, out: Path, dtype: str | None, max_shard_size: str, layout: str) -> bool:
    """An HF safetensors folder of a float MistralForCausalLM, a shard at a time, as `_convert_gguf`
    does (loading a 7B whole took 1.4x its float32 weights). False, with nothing written, for any
    other folder (pickled or quantized weights, a Mistral-layout folder, names or shapes of
    another model): the caller loads those whole, as `from_pretrained` reads them."""
    from .checkpoints.mistral_format import is_mistral_folder
    from .checkpoints.safetensors import lazy_tensors
    from .config import MistralConfig
    from .dtypes import resolve_dtype
    from .loading import build_on_meta
    from .modeling import MistralForCausalLM

    if folder.is_file() or is_mistral_folder(folder) or not (folder / "config.json").is_file():
        return False
    config = MistralConfig.from_pretrained(folder)
    target = resolve_dtype(dtype or "float32")
    tensors = lazy_tensors(folder, target)
    shapes = {name: tuple(p.shape) for name, p in build_on_meta(MistralForCausalLM, config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # the embedding's: save_pretrained writes it once
    if tensors is None or len(tensors) != len(shapes) or any(shapes.get(t.name) != t.shape for t in tensors):
        return False
    _write_streamed(folder, out, config, tensors, target, max_shard_size, layout)
    return True


def _write_streamed(source: Path, out: Path, config: Any, tensors: list, dtype: Any, max_shard_size: str,
                    layout: str) -> None:
    """`tensors` (LazyTensors in the torch `dtype`, made as their shard is written) and `source`'s
    tokenizer as an HF folder, or a Mistral-layout one."""
    from .checkpoints.safetensors import save_state_dict
    from .tokenizer import MistralTokenizer

    start = time.perf_counter()
    name = str(dtype).removeprefix("torch.")
    print(f"converting {source.name} ({sum(t.nbytes for t in tensors) / 1e9:.2f} GB in {name}) ...",
          end="", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "mistral":
        from .checkpoints.mistral_format import save_mistral_layout

        save_mistral_layout(tensors, config, out, max_shard_size=max_shard_size)
    else:
        config.architectures = ["MistralForCausalLM"]
        config.torch_dtype = dtype
        config.save_pretrained(out)
        save_state_dict(tensors, out, max_shard_size)
    MistralTokenizer.from_pretrained(source).save_pretrained(out)
    print(f" {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    mode = "full" if args.full else "qlora" if args.qlora else "lora"
    config = FinetuneConfig(data=args.data, out=args.out, model=args.model, mode=mode, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, lora_r=args.lora_r,
                            lora_alpha=args.lora_alpha, targets=tuple(args.target_modules.split(",")),
                            gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                            resume=args.resume, skip_bad_lines=args.skip_bad_lines, eval_data=args.eval_data,
                            seed=args.seed)
    results = finetune(config)
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (only: is the extra installed?)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MistralLMError(f"serving needs the 'serve' extra ({exc.name} is missing): "
                             "pip install 'mistral_lm[serve]'") from None
    from .server.app import serve

    return serve(model_path=args.model, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
                 quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype, cors_origins=args.cors_origin,
                 prefix_cache_mb=args.prefix_cache_mb) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-lm", description="Run Mistral-family models locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--model", help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: float32, or bfloat16 around quantized weights")
        return p

    def quantize_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quantize", default="auto", choices=list(QUANTIZE_CHOICES),
                       help="auto: a GGUF's own blocks (gguf), else none; int8/int4/nf4 quantize at load")
        p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="the KV cache's dtype; default: float16 on a GGUF's own blocks (llama.cpp's "
                            "default), else the model's dtype")

    def sampling_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=TEMPERATURE,
                       help=f"0 = greedy (default {TEMPERATURE}, with top-k {TOP_K}, top-p {TOP_P} and min-p "
                            f"{MIN_P}: llama.cpp's defaults)")
        p.add_argument("--top-k", type=int, default=TOP_K, help="0 = off")
        p.add_argument("--top-p", type=float, default=TOP_P, help="1 = off")
        p.add_argument("--min-p", type=float, default=MIN_P, help="0 = off")
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None,
                       help="for sampling (default: a random one, printed with the token count)")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step: faster tokens after a one-off compile "
                            "(not for models the fused native step takes, which are faster without it)")
        quantize_flag(p)

    gen = add("generate", cmd_generate, "continue or answer one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="no chat template: plain continuation")
    gen.add_argument("--adapter", default=None, help="a LoRA adapter folder (mistral-lm finetune, or peft's)")
    sampling_flags(gen)
    chat = add("chat", cmd_chat, "interactive chat (reads stdin)")
    chat.add_argument("--system", default=None, help="system prompt")
    sampling_flags(chat)
    add("info", cmd_info, "print the config and parameter count")
    conv = add("convert", cmd_convert, "write an HF (or Mistral-layout) safetensors folder")
    conv.add_argument("output")
    conv.add_argument("--max-shard-size", default="5GB")
    conv.add_argument("--layout", default="hf", choices=["hf", "mistral"],
                      help="hf: config.json + model*.safetensors; mistral: params.json + consolidated*.safetensors")
    tune = add("finetune", cmd_finetune, "supervised fine-tuning on chat JSON lines (LoRA by default)")
    tune.add_argument("--data", required=True, help='JSON lines of {"messages": [{"role", "content"}, ...]}')
    tune.add_argument("--out", required=True, help="output folder: the adapter (or model) and checkpoints")
    how = tune.add_mutually_exclusive_group()
    how.add_argument("--qlora", action="store_true", help="LoRA over 4-bit weights (a GGUF's blocks, else NF4)")
    how.add_argument("--full", action="store_true", help="train every weight and save the whole model")
    tune.add_argument("--steps", type=int, default=100)
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--lr", type=float, default=2e-4)
    tune.add_argument("--max-length", type=int, default=512, help="longer conversations are left out (counted)")
    tune.add_argument("--lora-r", type=int, default=8)
    tune.add_argument("--lora-alpha", type=int, default=16)
    tune.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30% more time")
    tune.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints")
    tune.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    tune.add_argument("--skip-bad-lines", action="store_true", help="skip (and name) data lines that are not chats")
    tune.add_argument("--eval-data", default=None, help="held-out chats: their loss is printed before and after")
    tune.add_argument("--seed", type=int, default=0)
    serve = add("serve", cmd_serve, "OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--cors-origin", action="append", default=None,
                       help="allow browser pages from this origin (repeat for several; '*' for any)")
    serve.add_argument("--prefix-cache-mb", type=int, default=256,
                       help="memory for reusing the keys of earlier prompts (next chat turns); 0 disables it")
    quantize_flag(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = _run(args)
    except MistralLMError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    _finish_tile_cache()
    return rc


def _finish_tile_cache() -> None:
    """A first load of a large GGUF writes its tiled weights beside the file while the command
    runs; a short command ends first. Exit waits for the write (gguf_install), and here says
    why: later loads map that file instead of tiling again."""
    from .quantization import gguf_install

    if gguf_install.cache_writes_pending():
        start = time.perf_counter()
        print("saving the tiled weights beside the model, for later loads ...", end="", file=sys.stderr, flush=True)
        gguf_install.wait_for_cache_writes()
        print(f" {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; under torchrun (tensor parallel) every rank runs `generate` in step and
    only rank 0 writes; `serve` listens on rank 0 while the other ranks replay its steps."""
    import os

    from .runtime import tensor_parallel_size

    if tensor_parallel_size() == 1:
        return args.fn(args)
    if args.fn not in (cmd_generate, cmd_serve):
        raise MistralLMError(f"under torchrun only `generate` and `serve` run tensor parallel; `{args.command}` "
                             "works in one process: run it without torchrun")
    import torch.distributed as dist

    quiet = os.environ.get("RANK", "0") != "0"  # the answer once; errors still reach every rank's stderr
    try:
        if quiet:
            with open(os.devnull, "w") as sink:
                sys.stdout = sink
                return args.fn(args)
        return args.fn(args)
    finally:
        sys.stdout = sys.__stdout__
        if dist.is_initialized():
            dist.destroy_process_group()
