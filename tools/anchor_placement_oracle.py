"""Expected `<AC>` placement for crates/anchor/tests/placement.rs, computed without kiln.

Each case's sentences are written by hand (each with the whitespace that precedes it in the
text), as NLTK punkt's English model would split them; the text is their concatenation plus a
tail. For the real SmolLM2 and Mistral tokenizers committed in tests/data/tokenizers, HF's Python
`tokenizers` encodes the whole text once (no special tokens); the bytes of each token are read
from its vocabulary string (GPT-2's byte-to-unicode table for SmolLM2; `▁` and `<0xNN>` byte
fallback for Mistral), not from the encoder's offsets, and an `<AC>` goes after the first token
that reaches a sentence's end:

- `document`: between sentences only, as the reference's training data
  (pangjh3/AnLLM run_allms.py `add_ac`: `' <AC> '.join(sent_tokenize(text))`);
- `prompt`: after every sentence, the last one too when it ends with a mark (the reference's
  `prompt_input_ac` template appends ` <AC> ` after the input); an open fragment gets none.

`<AC>` is added as a special token, as kiln's `add_ac_token` does, and its id recorded.

    python3 tools/anchor_placement_oracle.py > crates/anchor/tests/data/placement_oracle.json
"""
import json
import re
import sys

from tokenizers import AddedToken, Tokenizer

TOKENIZERS = {
    "smollm2": "tests/data/tokenizers/smollm2-135m-instruct/tokenizer.json",
    "mistral": "tests/data/tokenizers/mistral-7b-v0.1/tokenizer.json",
}

# (name, sentences with their leading whitespace, tail after the last sentence, last closed)
CASES = [
    (
        "abbreviations",
        [
            "Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. today.",
            " It rained, e.g. on the roads, i.e. everywhere.",
            " The U.S. team won.",
        ],
        "",
        True,
    ),
    (
        "decimals_and_marks",
        ["Prices rose 3.5 percent in 2019.", " The index fell 1.25 points!", " Why?"],
        "\n",
        True,
    ),
    (
        "quotes",
        [
            'He said "Stop."',
            " Then he left (quickly.)",
            " She wrote \u201cDone.\u201d",
            " \u2018It\u2019s over.\u2019",
        ],
        "",
        True,
    ),
    (
        "newlines",
        [
            "First line ends here.",
            "\nSecond one starts after a newline.",
            "\n\nA new paragraph!",
        ],
        "\n",
        True,
    ),
    (
        "trailing_fragment",
        ["The sky is blue.", " Grass is green.", " So the answer is"],
        "",
        False,
    ),
    (
        "etc_and_ellipsis",
        ["Pens, ink, etc. are sold here.", " Wait... what happened?", " Nothing..."],
        "",
        True,
    ),
    ("single", ["One sentence only."], "", True),
]


def gpt2_byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = gpt2_byte_decoder()


def token_bytes(kind, piece):
    if kind == "smollm2":
        return bytes(BYTE_DECODER[c] for c in piece)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


def placement(kind, tok, text, sentences, last_closed, ac_id):
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = [token_bytes(kind, tok.id_to_token(i)) for i in ids]
    data = text.encode()
    joined = b"".join(pieces)
    skip = len(joined) - len(data)  # Mistral's prepended space
    assert joined[skip:] == data and joined[:skip] == b" " * skip, (kind, text)
    ends, total = [], -skip
    for p in pieces:
        total += len(p)
        ends.append(total)
    boundaries, so_far = [], ""
    for s in sentences:
        so_far += s
        boundaries.append(len(so_far.encode()))
    forms = {}
    for form in ("document", "prompt"):
        anchored = boundaries[:-1]
        if form == "prompt" and last_closed:
            anchored = boundaries
        out = []
        todo = list(anchored)
        for i, e in zip(ids, ends):
            out.append(i)
            while todo and e >= todo[0]:
                out.append(ac_id)
                todo.pop(0)
        out += [ac_id] * len(todo)
        forms[form] = out
    return ids, forms


def main():
    result = {}
    for kind, path in TOKENIZERS.items():
        tok = Tokenizer.from_file(path)
        tok.add_special_tokens([AddedToken("<AC>", special=True)])
        ac_id = tok.token_to_id("<AC>")
        cases = []
        for name, sentences, tail, last_closed in CASES:
            text = "".join(sentences) + tail
            ids, forms = placement(kind, tok, text, sentences, last_closed, ac_id)
            cases.append(
                {
                    "name": name,
                    "text": text,
                    "sentences": sentences,
                    "last_closed": last_closed,
                    "ids": ids,
                    "document": forms["document"],
                    "prompt": forms["prompt"],
                }
            )
        extra = {}
        if kind == "smollm2":
            # `ĠThe` (a sentence start inside the text) and `The` (the old per-sentence encoding).
            extra = {"space_the_id": tok.token_to_id("\u0120The"), "the_id": tok.token_to_id("The")}
        result[kind] = {"ac_id": ac_id, **extra, "cases": cases}
    json.dump(result, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
