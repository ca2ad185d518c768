# How far HF transformers' own f16/bf16 forward is from its f32 reference on kiln's fixtures
# (the bounds `hf_f16_deviation` in tests/common/mod.rs holds kiln's f16 path to).
# Usage, from the repository root, with torch + transformers (tools/requirements.txt):
#   python tools/hf_half_precision.py llama2-mha llama3-gqa llama3-gqa-oldconfig llama-tied yi \
#       mistral-sw llama2-bf16 llama3-sharded nllb-tiny t5-relu-tied t5v11-gated-untied \
#       t5v11-gated-tied-noscale flan-t5-current
# Decoder-only: prefill logits, then cached steps fed HF's greedy ids (kiln's check_single), and
# whether greedy generation keeps HF's f32 tokens. Encoder-decoders: encoder states and
# teacher-forced logits.
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM


def causal(d, ref, dtype):
    prompt = ref["prompt_ids"].reshape(1, -1)
    greedy = ref["greedy_ids"].reshape(-1)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        out = m(prompt, use_cache=True)
        worst = (out.logits[0].float() - ref["prefill_logits"].reshape(out.logits.shape[1], -1)).abs().max().item()
        past, logits = out.past_key_values, out.logits[0, -1].float()
        for i in range(ref["step_logits"].shape[0]):
            worst = max(worst, (logits - ref["step_logits"][i]).abs().max().item())
            if i + 1 < len(greedy):
                o = m(greedy[i:i + 1].reshape(1, 1), past_key_values=past, use_cache=True)
                past, logits = o.past_key_values, o.logits[0, -1].float()
        g = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(greedy), do_sample=False)
    same = (g[0, prompt.shape[1]:] == greedy).all().item()
    return f"max |dlogit| {worst:.3e}, greedy equal {same}"


def seq2seq(d, ref, dtype):
    inp = ref["input_ids"].reshape(1, -1)
    dec = ref["decoder_input_ids"].reshape(1, -1)
    m = AutoModelForSeq2SeqLM.from_pretrained(d, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        enc = m.get_encoder()(inp).last_hidden_state[0].float()
        h = (enc - ref["encoder_hidden"].reshape(enc.shape)).abs().max().item()
        lg = m(input_ids=inp, decoder_input_ids=dec).logits[0].float()
        l = (lg - ref["decoder_logits"].reshape(lg.shape)).abs().max().item()
    return f"encoder max |d| {h:.3e}, teacher-forced logits max |d| {l:.3e}"


for name in sys.argv[1:]:
    d = f"tests/fixtures/{name}"
    ref = load_file(f"{d}/reference.safetensors")
    run = seq2seq if json.load(open(f"{d}/config.json")).get("is_encoder_decoder") else causal
    for dtype in (torch.float16, torch.bfloat16):
        print(f"{name} {str(dtype)[6:]}: {run(d, ref, dtype)}", flush=True)
