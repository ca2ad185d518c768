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

    python3 tools/ensemble_oracle.py > crates/ensemble/tests/data/deepen_oracle.json
"""
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

embeddings = [torch.randn(v, DIM, dtype=DT) * (0.5 + torch.rand(v, 1, dtype=DT) * 2) for v in VOCABS]
logits = [torch.randn(v, dtype=DT) * 2.0 for v in VOCABS]


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
    for w, l, r in zip(WEIGHTS, logits, matrices):
        avg += w * (nn.functional.softmax(l, dim=-1) @ r)
    return avg


def adamw_search(r_main, target):
    z = logits[0].detach().clone().unsqueeze(0).requires_grad_(True)
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
    z = logits[0].detach().clone().requires_grad_(True)
    for _ in range(STEPS):
        q = nn.functional.softmax(z, dim=-1) @ r_main
        loss = nn.functional.kl_div(torch.log(q), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        z = (z - LR * g).detach().requires_grad_(True)
    return z.detach()


dense = [transfer_matrix(e, a) for e, a in zip(embeddings, ANCHORS)]
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
    "embeddings": [e.tolist() for e in embeddings],
    "logits": [l.tolist() for l in logits],
    "relative_dense": [r.tolist() for r in dense],
    "average_dense": avg_dense.tolist(),
    "average_top_k": avg_sparse.tolist(),
    "adamw_dense": adamw_search(dense[0], avg_dense).tolist(),
    "sgd_dense": sgd_search(dense[0], avg_dense).tolist(),
    "adamw_top_k": adamw_search(sparse[0], avg_sparse).tolist(),
    "start_argmax": int(torch.argmax(logits[0])),
}
print(json.dumps(out, indent=1))
