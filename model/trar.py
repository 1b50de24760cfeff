"""TRAR's router: routing the attention spans of a Transformer (Zhou et al., ICCV 2021).

Each block computes one attention map per *order*: order 0 is global, order `o` lets a patch attend
to the patches within Chebyshev distance `o` on the patch grid. A router predicts per-sample
weights over the orders and the block's output is the weighted mix of the per-order outputs.

This module holds the `Router` (pooling + MLP + softmax / Gumbel-softmax) and its checks; the spans and the
weighted mix (`routed_attention`, computed without ever materialising the (B, L, H, N, N) stack of maps) are
`model.attention`'s.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ('avg', 'attention', 'fc')
ROUTINGS = ('soft', 'hard')


def check_routing(pooling: str, routing: str) -> None:
    """Reject unknown router pooling or routing names."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")


def sample_gumbel(logits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise shaped like `logits`, drawn as TRAR's and torch's `gumbel_softmax` draw it."""
    return -torch.empty_like(logits).exponential_().log()


class StdLayerNorm(nn.Module):
    """TRAR's LayerNorm (OpenVQA's): `weight * (x - mean) / (std + eps) + bias`, std unbiased, eps added to the std.

    Not `nn.LayerNorm`, which divides by sqrt(biased variance + eps): the attention pooling keeps the original's.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.bias


class AttentionPooling(nn.Module):
    """TRAR's `AttFlat` with one glimpse: (B, N, D) tokens -> (B, D).

    Token scores from an MLP (D -> D, ReLU, dropout, D -> 1), a softmax over the tokens, the weighted
    sum of the tokens, a D -> D `merge`, then TRAR's LayerNorm.
    """

    def __init__(self, dim: int, dropout_rate: float):
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout_rate)
        self.score = nn.Linear(dim, 1)
        self.merge = nn.Linear(dim, dim)
        self.norm = StdLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(self.dropout(F.relu(self.hidden(x)))).softmax(dim=1)
        return self.norm(self.merge((weights * x).sum(dim=1)))


class Router(nn.Module):
    """Predicts per-sample weights over the span orders from a block's input tokens (TRAR's routing blocks).

    Pooling over tokens (`avg`: the mean; `attention`: TRAR's `AttFlat`, whose dropout is `dropout_rate`;
    `fc`: a softmax of one linear score per token), a two-layer MLP (D -> D / reduction without bias,
    ReLU, -> orders), then softmax (`soft`) or Gumbel-softmax with temperature `tau` (`hard`).
    Hard routing samples Gumbel noise in training; at evaluation it is `softmax(logits / tau)`, unless
    `eval_noise` samples there too, as the original code does. With `binarize`, evaluation returns the
    one-hot argmax of those weights, for either routing.
    """

    def __init__(self, dim: int, num_orders: int, pooling: str = 'avg', routing: str = 'soft',
                 binarize: bool = False, reduction: int = 2, dropout_rate: float = 0.1, eval_noise: bool = False):
        super().__init__()
        check_routing(pooling, routing)
        self.pooling, self.routing, self.binarize, self.eval_noise = pooling, routing, binarize, eval_noise
        if pooling == 'attention':
            self.attention_pool = AttentionPooling(dim, dropout_rate)
        elif pooling == 'fc':
            self.token_scores = nn.Linear(dim, 1)
        hidden = max(dim // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_orders))
        self.register_buffer('tau', torch.tensor(1.0))  # saved: evaluation uses the temperature reached

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D) summary."""
        if self.pooling == 'avg':
            return x.mean(dim=1)
        if self.pooling == 'attention':
            return self.attention_pool(x)
        weights = self.token_scores(x).softmax(dim=1)
        return (weights * x).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_orders) routing weights, each row summing to one."""
        logits = self.mlp(self.pool(x)).float()
        if self.routing == 'hard':
            noisy = self.training or self.eval_noise
            logits = ((logits + sample_gumbel(logits)) if noisy else logits) / self.tau
        if self.binarize and not self.training:
            return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        return logits.softmax(dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_router_keys([key for key in state_dict if key.startswith(prefix)], self.pooling)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_router_keys(keys: Iterable[str], pooling: str) -> None:
    """Refuse in one line, for `attention` pooling, router weights of the earlier attention pooling.

    That pooling was a D -> D/2 -> 1 token scorer saved at `...router.token_scores.{0,2}.*`; it was replaced
    by TRAR's `AttFlat` (`...router.attention_pool.*`), so its weights cannot be loaded, and a key-by-key
    mismatch would not say why. `Router` checks on `load_state_dict`; loaders that copy tensors call it.
    """
    if pooling != 'attention':
        return
    old = next((key for key in keys if key.endswith('token_scores.0.weight')), None)
    if old is not None:
        raise ValueError(f"{old.removesuffix('0.weight')}*: these router weights are of the earlier attention "
                         "pooling (a D->D/2->1 token scorer), replaced by TRAR's AttFlat (attention_pool.*), and "
                         "cannot be loaded; drop the router keys and load with strict=False to retrain the routers")
