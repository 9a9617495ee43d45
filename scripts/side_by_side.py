#!/usr/bin/env python3
"""The same measurements as `refine-poi bench`, in Hugging Face transformers (PyTorch) and, when
`llama_cpp` is importable, in llama.cpp: prefill of a 400-token prompt, greedy decoding at
batch 1 and at batch 8 (8 rows continuing one prompt), peak memory. Prints one JSON object per
system. Run by scripts/side-by-side.sh, which also runs `refine-poi bench` in the same sitting.

Usage: side_by_side.py GGUF --threads N --prompt-tokens P --new-tokens T --samples G --repeats R
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

# The sentence `refine-poi bench` repeats to build its prompt (src/commands/bench.rs).
SENTENCE = "At 2012-04-03 18:00 (Tuesday), POI 3695 (Coffee Shop); "


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prompt_ids(encode, n):
    ids = []
    while len(ids) < n:
        ids.extend(encode(SENTENCE))
    return ids[:n]


def hf(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(lambda s: tok.encode(s, add_special_tokens=False), args.prompt_tokens)])

    def prefill(rows):
        out = model(input_ids=ids.expand(rows, -1), use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(rows):
        cache, nxt = prefill(rows)
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - start

    with torch.inference_mode():
        prefill(1)  # warm-up
        prefill_s, d1, dg = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            prefill(1)
            prefill_s.append(time.perf_counter() - start)
            d1.append(decode(1))
            dg.append(decode(args.samples))
    return {
        "system": f"transformers {transformers.__version__} + torch {torch.__version__}, f32 (the GGUF dequantised)",
        "threads": torch.get_num_threads(),
        "load_seconds": load_s,
        "prompt_tokens": args.prompt_tokens,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefill_s),
        "decode_batch1_tokens_per_s": args.new_tokens / statistics.median(d1),
        "decode_batch_samples": args.samples,
        "decode_batch_tokens_per_s": args.new_tokens * args.samples / statistics.median(dg),
        "decode_batch_note": "the 8 rows hold 8 copies of the prompt's cache (one batched prefill, untimed)",
        "peak_rss_mib": peak_rss_mib(),
    }


def llama_cpp(args):
    import llama_cpp

    start = time.perf_counter()
    n_ctx = args.prompt_tokens + args.new_tokens + 8
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=n_ctx,
        n_batch=n_ctx,  # the Python API keeps n_batch rows of scores, indexed by position
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=True), args.prompt_tokens)

    def prefill():
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    def decode():
        prefill()
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([nxt])
        return time.perf_counter() - start

    prefill()  # warm-up
    prefill_s = [prefill() for _ in range(args.repeats)]
    d1 = [decode() for _ in range(args.repeats)]
    return {
        "system": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), the GGUF's own quantised weights",
        "threads": args.threads,
        "load_seconds": load_s,
        "prompt_tokens": args.prompt_tokens,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefill_s),
        "decode_batch1_tokens_per_s": args.new_tokens / statistics.median(d1),
        "decode_batch_tokens_per_s": None,
        "decode_batch_note": "not measured: the high-level Python API decodes one sequence",
        "peak_rss_mib": peak_rss_mib(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--system", choices=["hf", "llama-cpp"], required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    result = hf(args) if args.system == "hf" else llama_cpp(args)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
