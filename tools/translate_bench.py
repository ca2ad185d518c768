#!/usr/bin/env python3
"""HF transformers' side of the translation benchmark (see bench/translate_bench.rs).

--write FOLDER  writes a random-weight checkpoint at NLLB-200-distilled-600M's shapes (config of
                facebook/nllb-200-distilled-600M; weights from transformers' own init, seeded),
                f32 safetensors, in HF layout.
--model FOLDER  measures `generate` on it: the same source ids as the Rust example (splitmix64),
                `--gen` tokens per sentence (EOS suppressed by min_new_tokens), greedy or beams,
                for each batch size; prints a line and a JSON line per batch size.

python tools/translate_bench.py --write /tmp/nllb600m-random
python tools/translate_bench.py --model /tmp/nllb600m-random --batch 1,8
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import M2M100Config, M2M100ForConditionalGeneration

MASK = (1 << 64) - 1


def splitmix(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def sentence(i, length, src_lang):
    state, ids = i, [src_lang]
    for _ in range(max(length - 2, 0)):
        state, z = splitmix(state)
        ids.append(4 + z % 249_996)
    return ids + [2]


def write(folder):
    # facebook/nllb-200-distilled-600M's config.json.
    config = M2M100Config(
        vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, max_position_embeddings=1024, scale_embedding=True,
        activation_function="relu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
        encoder_layerdrop=0, decoder_layerdrop=0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, init_std=0.02, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    print(f"wrote {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")


def bench(args):
    torch.set_num_threads(args.threads)
    model = M2M100ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    common = dict(
        max_new_tokens=args.gen, min_new_tokens=args.gen, num_beams=args.beams,
        forced_bos_token_id=args.tgt_lang, do_sample=False,
    )
    if args.beams > 1:
        common["early_stopping"] = True
    with torch.inference_mode():
        warm = torch.tensor([sentence(0, 8, args.src_lang)])
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), **{**common, "max_new_tokens": 2, "min_new_tokens": 2})
        for batch in args.batch:
            ids = torch.tensor([sentence(i, args.src_len, args.src_lang) for i in range(batch)])
            secs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **common)
                secs.append(time.perf_counter() - t)
                # decoder start + gen tokens
                assert out.shape[1] == args.gen + 1, out.shape
            s = statistics.median(secs)
            print(f"transformers {transformers.__version__} (torch {torch.__version__}, {args.threads} threads): "
                  f"batch {batch}, beams {args.beams}: {s:.2f} s per call | {batch / s:.2f} sentences/s | "
                  f"{batch * args.gen / s:.1f} tokens/s")
            print(json.dumps({"impl": "transformers", "batch": batch, "beams": args.beams, "src_len": args.src_len,
                              "gen": args.gen, "seconds": s, "seconds_runs": secs,
                              "sentences_per_s": batch / s, "tokens_per_s": batch * args.gen / s}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", metavar="FOLDER")
    p.add_argument("--model", metavar="FOLDER")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--src-len", type=int, default=24)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--src-lang", type=int, default=256047)
    p.add_argument("--tgt-lang", type=int, default=256042)
    args = p.parse_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.write:
        write(args.write)
    if args.model:
        bench(args)
    if not (args.write or args.model):
        p.error("give --write FOLDER and/or --model FOLDER")


if __name__ == "__main__":
    main()
