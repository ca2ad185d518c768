"""DeePEn's combination step computed as the authors' code computes it (PyTorch, float64), for
crates/ensemble/tests/oracle.rs: three members with different vocabularies and unequal weights,
temperature 3, embeddings whose rows are not unit-norm, and a 12-step search (past the cosine
schedule's period of 10).

Follows OrangeInSouth/DeePEn: transfer_matrix.py (torch.cosine_similarity of every embedding with
the anchors' embeddings, each row L2-normalised, softmax(tau * row)) and
based_on_probaility_transfer_logits_processor.py (relative representations averaged with the
ensemble weights, main member first; AdamW(lr, betas=(0.9, 0.999)) with PyTorch's default weight
decay 0.01, CosineAnnealingLR(T_max=10, eta_min=lr/4) stepped after each update,
nn.KLDivLoss()(log(softmax(z) @ R_main), average)). Also the paper's plain gradient step on the
summed KL, and the same search over rows cut to their top k and renormalised (kiln's sparse form).

    python3 tools/ensemble_oracle.py deepen > crates/ensemble/tests/data/deepen_oracle.json

And the reference's anchors (common_vocabulary.py: token strings with 'Ġ' -> '▁', added tokens
included) between the real tokenizers committed in tests/data/tokenizers:

    python3 tools/ensemble_oracle.py anchors > crates/ensemble/tests/data/reference_anchors.json
"""
import sys
import json

import torch
from torch import nn
from torch.optim import lr_scheduler

torch.manual_seed(20240417)
DT = torch.float64
TAU = 3.0
LR = 0.15
STEPS = 12
TOP_K = 3
VOCABS = [8, 11, 6]
DIM = 5
ANCHORS = [[0, 2, 3, 5, 7], [10, 1, 4, 6, 8], [5, 0, 1, 2, 4]]
WEIGHTS = [0.5, 0.3, 0.2]

EMBEDDINGS = [torch.randn(v, DIM, dtype=DT) * (0.5 + torch.rand(v, 1, dtype=DT) * 2) for v in VOCABS]
LOGITS = [torch.randn(v, dtype=DT) * 2.0 for v in VOCABS]



def transfer_matrix(e, anchors):
    cos = torch.cosine_similarity(e.unsqueeze(1), e[anchors].unsqueeze(0), dim=-1)
    rel = nn.functional.normalize(cos, p=2, dim=-1)
    return nn.functional.softmax(rel * TAU, dim=-1)


def top_k_rows(r, k):
    values, indices = torch.topk(r, k, dim=-1)
    out = torch.zeros_like(r).scatter(-1, indices, values)
    return out / out.sum(-1, keepdim=True)


def average(matrices):
    avg = torch.zeros(len(ANCHORS[0]), dtype=DT)
    for w, l, r in zip(WEIGHTS, LOGITS, matrices):
        avg += w * (nn.functional.softmax(l, dim=-1) @ r)
    return avg


def adamw_search(r_main, target):
    z = LOGITS[0].detach().clone().unsqueeze(0).requires_grad_(True)
    criterion = nn.KLDivLoss()
    optimizer = torch.optim.AdamW(params=[z], lr=LR, betas=(0.9, 0.999))
    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=LR / 4)
    for _ in range(STEPS):
        q = nn.functional.softmax(z, dim=-1) @ r_main
        loss = criterion(torch.log(q), target.unsqueeze(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return z.detach()[0]


def sgd_search(r_main, target):
    z = LOGITS[0].detach().clone().requires_grad_(True)
    for _ in range(STEPS):
        q = nn.functional.softmax(z, dim=-1) @ r_main
        loss = nn.functional.kl_div(torch.log(q), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        z = (z - LR * g).detach().requires_grad_(True)
    return z.detach()





def reference_anchors(main_path, assist_path):
    """The reference's common vocabulary (common_vocabulary.py) of two tokenizer.json files:
    get_vocab() with added tokens, 'Ġ' replaced by '▁', keys intersected. Returns the pairs
    (main id, assist id) sorted by main id, and how many keys collided after the replacement."""
    from tokenizers import Tokenizer

    def vocab(path):
        out, collisions = {}, 0
        for key, idx in Tokenizer.from_file(path).get_vocab(with_added_tokens=True).items():
            new = key.replace("Ġ", "▁")
            collisions += new in out
            out[new] = idx
        return out, collisions

    (a, ca), (b, cb) = vocab(main_path), vocab(assist_path)
    pairs = sorted((a[k], b[k]) for k in set(a) & set(b))
    return pairs, ca + cb


def checksum(pairs):
    h = 0
    for m, s in pairs:
        h = ((h * 1000003 + m) * 1000003 + s) % 2**64
    return h


def consistency(e_main, e_assist, ids_main, ids_assist, count):
    """get_anchor_point_list_our: each shared token's row of cosine similarities with the other
    shared tokens, in each model; a token's consistency is the cosine of its two rows; the
    `count` most consistent are kept (sorted, descending; Python's stable sort on ties)."""
    a, b = e_main[ids_main], e_assist[ids_assist]
    sa = torch.cosine_similarity(a.unsqueeze(1), a.unsqueeze(0), dim=-1)
    sb = torch.cosine_similarity(b.unsqueeze(1), b.unsqueeze(0), dim=-1)
    scores = torch.cosine_similarity(sa, sb, dim=-1).tolist()
    ranked = sorted(enumerate(scores), key=lambda x: x[1], reverse=True)
    return scores, [i for i, _ in ranked[:count]]


CONSISTENCY_MAIN = [0, 1, 2, 3, 4, 5, 6, 7]
CONSISTENCY_ASSIST = [3, 0, 9, 1, 10, 2, 5, 7]


def deepen():
    dense = [transfer_matrix(e, a) for e, a in zip(EMBEDDINGS, ANCHORS)]
    sparse = [top_k_rows(r, TOP_K) for r in dense]
    avg_dense, avg_sparse = average(dense), average(sparse)
    out = {
        "source": "tools/ensemble_oracle.py, torch " + torch.__version__,
        "temperature": TAU,
        "learning_rate": LR,
        "steps": STEPS,
        "top_k": TOP_K,
        "weights": WEIGHTS,
        "anchors": ANCHORS,
        "embeddings": [e.tolist() for e in EMBEDDINGS],
        "logits": [l.tolist() for l in LOGITS],
        "relative_dense": [r.tolist() for r in dense],
        "average_dense": avg_dense.tolist(),
        "average_top_k": avg_sparse.tolist(),
        "adamw_dense": adamw_search(dense[0], avg_dense).tolist(),
        "sgd_dense": sgd_search(dense[0], avg_dense).tolist(),
        "adamw_top_k": adamw_search(sparse[0], avg_sparse).tolist(),
        "start_argmax": int(torch.argmax(LOGITS[0])),
    }
    scores, kept = consistency(EMBEDDINGS[0], EMBEDDINGS[1], CONSISTENCY_MAIN, CONSISTENCY_ASSIST, 5)
    out["consistency"] = {
        "main": CONSISTENCY_MAIN,
        "assist": CONSISTENCY_ASSIST,
        "scores": scores,
        "kept": kept,
    }
    return out


def anchors():
    root = "tests/data/tokenizers/"
    out = {"source": "tools/ensemble_oracle.py anchors, tokenizers (Python)"}
    for assist in ["mistral-7b-v0.1", "t5"]:
        pairs, collisions = reference_anchors(
            root + "smollm2-135m-instruct/tokenizer.json", root + assist + "/tokenizer.json"
        )
        out[assist] = {
            "count": len(pairs),
            "checksum": str(checksum(pairs)),
            "collisions": collisions,
            "first": pairs[:16],
        }
    return out


NUMBER_CASES = [
    "The answer is 1,234,567.",
    "1,2,3",
    "3.5.7 apples",
    "It costs $12.50, then 3 more",
    "no digits here",
    "She has 10.",
    "-5 and 7.25",
    "1,000.5 and 2,00",
    "12a34",
    "#### 72",
    "0.5.",
]


def numbers():
    """GSM8K answers as the reference's utils/evaluate/GSM.py extracts them."""
    import re

    def extract_last_num(text):
        text = re.sub(r"(\d),(\d)", "\\g<1>\\g<2>", text)
        res = re.findall(r"(\d+(\.\d+)?)", text)
        return str(res[-1][0]) if res else None

    return {case: extract_last_num(case) for case in NUMBER_CASES}


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "deepen"
    print(json.dumps({"deepen": deepen, "anchors": anchors, "numbers": numbers}[mode](), indent=1))
