"""How much a frozen encoder's features tell about labels, trained on one set of videos and tested on another:
kNN (cosine on standardized features, temperature-weighted votes), a linear probe (logistic regression) and an
attentive probe (a learned query cross-attending to the token grid, then a linear head: V-JEPA's protocol) on
cached features (trainer/features.py). Each score comes with its 95% interval from the number of queries (Wilson's):
with 144 queries a 15-point difference is beyond it, with 16 a 25-point one is not."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion, in percent."""
    if not total:
        return 0.0, 100.0
    p = correct / total
    centre, half = p + z * z / (2 * total), z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    scale = 1 + z * z / total
    return round(100 * (centre - half) / scale, 1), round(100 * (centre + half) / scale, 1)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1 and top-5 (percent) of class scores [N, C] against labels [N], the top-1's 95% interval."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = int((top[:, 0] == labels).sum())
    return {"top1": round(100 * correct / len(labels), 2), "top1_interval": interval(correct, len(labels)),
            "top5": round(100 * float((top == labels[:, None]).any(1).float().mean()), 2), "queries": len(labels)}


def _standardized(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int, k: int = 20,
        temperature: float = 0.07) -> torch.Tensor:
    """Class scores [N_test, classes]: the k nearest training features by cosine similarity vote, each exp(sim / T)."""
    train, test = (F.normalize(x.float(), dim=1) for x in _standardized(train.float(), test.float()))
    similarity, nearest = (test @ train.T).topk(min(k, len(train)), dim=1)
    return torch.zeros(len(test), classes).scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())


def linear(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int,
           weight_decay: float = 1e-3, iterations: int = 300) -> torch.Tensor:
    """Class scores of a logistic regression on standardized features (L-BFGS, L2 penalty)."""
    train, test = _standardized(train.float(), test.float())
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return test @ weight + bias


class AttentivePooler(nn.Module):
    """One learned query cross-attending to the token grid, then a linear head."""

    def __init__(self, dim: int, classes: int, heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L, D] -> [N, classes]."""
        x = self.norm(tokens)
        pooled = self.attention(self.query.expand(len(x), -1, -1), x, x, need_weights=False)[0][:, 0]
        return self.head(pooled)


def attentive(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int,
              epochs: int = 60, lr: float = 1e-3, weight_decay: float = 0.05, batch: int = 32,
              seed: int = 0) -> torch.Tensor:
    """Class scores of an attentive probe trained on token grids [N, L, D] (AdamW, one-cycle schedule)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = next(h for h in (4, 2, 1) if train.shape[-1] % h == 0)
        probe = AttentivePooler(train.shape[-1], classes, heads)
    train, test = train.float(), test.float()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch):
            rows = order[start:start + batch]
            loss = F.cross_entropy(probe(train[rows]), train_labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return torch.cat([probe(test[i:i + 256]) for i in range(0, len(test), 256)])


PROBES = {"knn": knn, "linear": linear, "attentive": attentive}  # attentive reads token grids, the others pooled ones
