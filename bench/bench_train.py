"""LoRA training speed and peak RSS on the embedded default model: ours vs Transformers + peft.

    python bench/bench_train.py                  # 3 interleaved runs per engine
    python bench/bench_train.py --runs 1 --steps 3

Each run is a fresh subprocess (peak RSS is that engine's alone): load, LoRA r=8 on every
projection (peft, unchanged), AdamW, one untimed step, then `--steps` timed optimizer steps on
batch x seq tokens of a fixed English text. Reported: training tokens/s and peak RSS, medians.
Engines: ours-fp32 (the GGUF dequantized to float32, as Transformers loads it), ours-q4-native
(QLoRA on the file's Q4_1 blocks, bfloat16 compute), ours-nf4 (QLoRA on NF4 re-quantized from the
float weights), hf-fp32 (Transformers' GGUF loader + peft). Transformers' 4-bit path needs
bitsandbytes, which has no CPU support here, so there is no hf 4-bit row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

ENGINES = ("ours-fp32", "ours-q4-native", "ours-nf4", "hf-fp32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("The harbour town wakes before the sun. Fishermen check their nets, bakers pull the first loaves "
        "from stone ovens, and the ferry to the islands sounds its horn twice. ") * 40


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def worker(engine: str, batch: int, seq: int, steps: int) -> dict:
    import peft
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    from mistral_lm.defaults import default_model_path

    path = default_model_path()
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGETS)
    if engine == "hf-fp32":
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
        ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    else:
        from mistral_lm import AutoTokenizer, BitsAndBytesConfig, MistralForCausalLM
        from mistral_lm.training import register_lora_layers

        ids = torch.tensor(AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"])
        if engine == "ours-fp32":
            model = MistralForCausalLM.from_pretrained(path)
        elif engine == "ours-q4-native":
            model = MistralForCausalLM.from_pretrained(path, gguf_native=True)
            config = register_lora_layers(config)
        else:
            model = MistralForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head"]))
            config = register_lora_layers(config)
    model = peft.get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = ids[: batch * seq].reshape(batch, seq)

    def step() -> float:
        optimizer.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    first = step()
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    elapsed = time.perf_counter() - start
    return {"tok_s": batch * seq * steps / elapsed, "peak_rss_mb": _peak_rss_mb(), "loss_first": first,
            "loss_last": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.steps)))
        return
    engines = [e for e in args.engines.split(",") if e]
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for run in range(args.runs):
        for engine in engines:  # interleaved: a slow spell of a shared machine hits every engine
            print(f"[run {run + 1}/{args.runs}] {engine} ...", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--worker", engine, "--runs", "1", "--steps",
                                  str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"LoRA r=8 on all projections, batch {args.batch} x {args.seq} tokens, {args.steps} AdamW steps, "
          f"median of {args.runs} runs\n")
    print("| engine | train tok/s | peak RSS MB | loss first -> last |")
    print("|---|---|---|---|")
    for engine, rows in results.items():
        if not rows:
            print(f"| {engine} | failed | | |")
            continue
        tok = statistics.median(r["tok_s"] for r in rows)
        rss = statistics.median(r["peak_rss_mb"] for r in rows)
        print(f"| {engine} | {tok:.0f} | {rss:.0f} | {rows[0]['loss_first']:.3f} -> {rows[0]['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
