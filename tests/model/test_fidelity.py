"""The router and a routed block against the original TRAR code, transcribed below as plain torch.

The transcriptions follow rentainhe/TRAR-VQA at commit 8f34441: `openvqa/models/TRAR/trar.py` (AttFlat,
getImgMasks, getMasks, SoftRoutingBlock, HardRoutingBlock, SARoutingBlock), `openvqa/ops/fc.py` (FC, MLP),
`openvqa/ops/layer_norm.py` (LayerNorm) and `utils/train_engine.py` (the tau policies). Weights are passed
under the original's parameter names, copied from this repository's modules by `original_weights`.
Hard routing draws its Gumbel noise from a fixed sample on both sides, so every comparison is exact.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model.trar as trar
from model.config import get_config
from model.modeling import Attention, VisionTransformer
from model.attention import span_masks
from model.trar import Router, check_router_keys
from utils.scheduler import tau_at

# ---- Transcription of the original code --------------------------------------------------------------


def original_layer_norm(x, a_2, b_2, eps=1e-6):
    """openvqa.ops.layer_norm.LayerNorm.forward."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    return a_2 * (x - mean) / (std + eps) + b_2


def make_mask(feature):
    """SoftRoutingBlock.make_mask (HardRoutingBlock's is the same): True for tokens whose features are all zero."""
    return (torch.sum(torch.abs(feature), dim=-1) == 0).unsqueeze(1).unsqueeze(2)


def original_att_flat(x, x_mask, w, training, dropout_r=0.1, glimpses=1):
    """AttFlat.forward; its `mlp` is openvqa.ops.fc.MLP(in, in, glimpses, dropout_r, use_relu=True), i.e.
    FC (Linear, ReLU, Dropout) then Linear; `norm` is openvqa's LayerNorm."""
    att = F.relu(F.linear(x, w['pool.mlp.fc.linear.weight'], w['pool.mlp.fc.linear.bias']))
    att = F.dropout(att, dropout_r, training)
    att = F.linear(att, w['pool.mlp.linear.weight'], w['pool.mlp.linear.bias'])
    att = att.masked_fill(x_mask.squeeze(1).squeeze(1).unsqueeze(2), -1e9)
    att = F.softmax(att, dim=1)
    att_list = []
    for i in range(glimpses):
        att_list.append(torch.sum(att[:, :, i: i + 1] * x, dim=1))
    x_atted = torch.cat(att_list, dim=1)
    x_atted = F.linear(x_atted, w['pool.linear_merge.weight'], w['pool.linear_merge.bias'])
    return original_layer_norm(x_atted, w['pool.norm.a_2'], w['pool.norm.b_2'])


def original_gumbel_softmax(logits, dim, temperature, gumbels):
    """HardRoutingBlock.gumbel_softmax, its `gumbels = -torch.empty_like(logits).exponential_().log()` passed in."""
    logits = (logits.log_softmax(dim=dim) + gumbels) / temperature
    return F.softmax(logits, dim=dim)


def original_routing_block(x, w, pooling, routing, tau, gumbels, training, dropout_r=0.1):
    """SoftRoutingBlock.forward (routing 'soft') and HardRoutingBlock.forward (routing 'hard')."""
    mlp = lambda h: F.linear(F.relu(F.linear(h, w['mlp.0.weight'])), w['mlp.2.weight'], w['mlp.2.bias'])
    if pooling == 'attention':
        x = original_att_flat(x, make_mask(x), w, training, dropout_r)
        logits = mlp(x.squeeze(-1))
    elif pooling == 'avg':
        x = x.transpose(1, 2)
        x = F.adaptive_avg_pool1d(x, 1)  # nn.AdaptiveAvgPool1d(1)
        logits = mlp(x.squeeze(-1))
    elif pooling == 'fc':
        mask = make_mask(x).squeeze().unsqueeze(2)
        scores = F.linear(x, w['pool.weight'], w['pool.bias'])
        scores = scores.masked_fill(mask, -1e9)
        scores = F.softmax(scores, dim=1)
        x = torch.sum(x.mul(scores), dim=1)
        logits = mlp(x)
    if routing == 'soft':
        return F.softmax(logits, dim=-1)
    return original_gumbel_softmax(logits, -1, tau, gumbels)


def argmax_binarize(alphas):
    """SARoutingBlock.argmax_binarize."""
    n = alphas.size()[0]
    out = torch.zeros_like(alphas)
    indexes = alphas.argmax(-1)
    out[torch.arange(n), indexes] = 1
    return out


def original_alphas(x, w, pooling, routing, tau, gumbels, binarize, training, dropout_r=0.1):
    """The routing weights of SARoutingBlock.forward: `routing_block(x, tau, masks)`, binarized outside training."""
    alphas = original_routing_block(x, w, pooling, routing, tau, gumbels, training, dropout_r)
    if binarize and not training:
        alphas = argmax_binarize(alphas)
    return alphas


def getImgMasks(scale, order):
    """getImgMasks: (scale**2, scale**2), True where a patch may NOT attend (outside its window)."""
    masks = []
    for i in range(scale):
        for j in range(scale):
            mask = np.ones([scale, scale], dtype=np.float32)
            for x in range(i - order, i + order + 1, 1):
                for y in range(j - order, j + order + 1, 1):
                    if (0 <= x < scale) and (0 <= y < scale):
                        mask[x][y] = 0
            masks.append(np.reshape(mask, [scale * scale]))
    return np.asarray(np.array(masks), dtype=bool)


def getMasks(x_mask, orders, scale):
    """getMasks: one mask per order, the padding mask `x_mask` for order 0 (no .cuda() here)."""
    mask_list = []
    for order in orders:
        if order == 0:
            mask_list.append(x_mask)
        else:
            mask = torch.from_numpy(getImgMasks(scale, order)).byte()
            mask_list.append(torch.logical_or(x_mask, mask))
    return mask_list


def original_sa_routing_block(x, w, masks, alphas, heads):
    """SARoutingBlock.forward after its routing weights, with routing_att (dropout is the identity in eval)."""
    n_batches, hidden = x.size(0), x.size(-1)
    v, k, q = (F.linear(x, w[f'linear_{name}.weight'], w[f'linear_{name}.bias'])
               .view(n_batches, -1, heads, int(hidden / heads)).transpose(1, 2) for name in 'vkq')
    d_k = q.size(-1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)
    for i in range(len(masks)):
        att_map = F.softmax(scores.masked_fill(masks[i], -1e9), dim=-1)
        att_list = att_map.unsqueeze(1) if i == 0 else torch.cat((att_list, att_map.unsqueeze(1)), 1)
    att_map = torch.einsum('bl,blcnm->bcnm', alphas, att_list)
    atted = torch.matmul(att_map, v)
    atted = atted.transpose(1, 2).contiguous().view(n_batches, -1, hidden)
    return F.linear(atted, w['linear_merge.weight'], w['linear_merge.bias'])


def original_tau(epoch, policy, tau_max, tau_min, max_epoch, warmup_epoch):
    """train_engine's temperature for `epoch` (TAU_POLICY 0 slow, 1 fast, 2 finetune)."""
    if policy == 0:
        return tau_max - (tau_max - tau_min) * epoch / (max_epoch - 1)
    if policy == 1:
        if epoch < warmup_epoch:
            return tau_max - (tau_max - 1) * epoch / warmup_epoch
        return 1.0 - (epoch - warmup_epoch) / (max_epoch - warmup_epoch)
    if epoch < warmup_epoch:
        return 1.0 - (epoch - max_epoch) / (warmup_epoch + 1)
    return 0.1


# ---- This repository's modules under the original's parameter names ---------------------------------

ROUTER_NAMES = {  # this repository -> the original's routing block
    'attention_pool.hidden': 'pool.mlp.fc.linear', 'attention_pool.score': 'pool.mlp.linear',
    'attention_pool.merge': 'pool.linear_merge', 'token_scores': 'pool', 'mlp': 'mlp',
}
BLOCK_NAMES = {'query': 'linear_q', 'key': 'linear_k', 'value': 'linear_v', 'out': 'linear_merge'}


def original_weights(module: torch.nn.Module, names: dict) -> dict:
    """`module`'s parameters renamed to the original's: prefixes mapped by `names`, LayerNorm weight/bias to a_2/b_2."""
    renamed = {}
    for key, value in module.named_parameters():
        if key.startswith('attention_pool.norm.'):
            renamed['pool.norm.' + {'weight': 'a_2', 'bias': 'b_2'}[key.rpartition('.')[2]]] = value.detach()
            continue
        prefix = next(p for p in names if key.startswith(p + '.'))
        renamed[names[prefix] + key[len(prefix):]] = value.detach()
    return renamed


def randomise(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (the LayerNorm's ones and zeros included) so that no term can hide."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


POOLINGS = ('avg', 'attention', 'fc')
# (routing, training, binarize, eval_noise): every way the routing weights are made
MODES = [('soft', True, False, False), ('soft', False, False, False), ('soft', False, True, False),
         ('hard', True, False, False), ('hard', True, True, False), ('hard', False, False, False),
         ('hard', False, True, False), ('hard', False, False, True), ('hard', False, True, True)]
# For a whole block: soft, soft binarized and hard binarized (per-image dispatch), hard in training, with eval noise
BLOCK_MODES = [('soft', False, False, False), ('soft', False, True, False), ('hard', True, False, False),
               ('hard', False, True, False), ('hard', False, True, True)]


def expected_alphas(x, w, pooling, routing, training, binarize, eval_noise, tau, gumbels):
    """What this repository's router computes, in the original's terms: the original's formula, with the
    Gumbel sample replaced by zeros where this repository samples none (hard routing at evaluation
    without `eval_noise`): softmax(log_softmax(logits) / tau) = softmax(logits / tau)."""
    noisy = routing == 'hard' and (training or eval_noise)
    noise = gumbels if noisy else torch.zeros_like(gumbels)
    return original_alphas(x, w, pooling, routing, tau, noise, binarize, training, dropout_r=0.0)


@pytest.fixture
def fixed_gumbels(monkeypatch):
    """A fixed Gumbel sample that the router draws instead of fresh noise."""
    gumbels = -torch.empty(6, 3).exponential_(generator=torch.Generator().manual_seed(7)).log()
    monkeypatch.setattr(trar, 'sample_gumbel', lambda logits: gumbels.to(logits))
    return gumbels


# ---- Tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('routing, training, binarize, eval_noise', MODES)
@pytest.mark.parametrize('pooling', POOLINGS)
def test_router_weights_equal_the_original(fixed_gumbels, pooling, routing, training, binarize, eval_noise):
    router = Router(16, 3, pooling, routing, binarize, dropout_rate=0.0, eval_noise=eval_noise)
    randomise(router)
    router.tau.fill_(0.7)
    router.train(training)
    x = torch.randn(6, 10, 16, generator=torch.Generator().manual_seed(1))
    expected = expected_alphas(x, original_weights(router, ROUTER_NAMES), pooling, routing, training, binarize,
                               eval_noise, 0.7, fixed_gumbels)
    torch.testing.assert_close(router(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('routing, training, binarize, eval_noise', BLOCK_MODES)
@pytest.mark.parametrize('pooling', POOLINGS)
def test_routed_block_equals_the_original_sa_routing_block(fixed_gumbels, pooling, routing, training, binarize,
                                                          eval_noise):
    """One block's attention (router, routed_attention, output projection) against SARoutingBlock's stacked maps.

    The original has no CLS token: its masks (getMasks over getImgMasks) get one that attends to and is
    attended by every token in every order, as this repository's span masks have it.
    """
    grid, orders, heads = 4, [0, 1, 2], 2
    config = get_config('testing')
    t = config.transformer
    t.orders, t.pooling, t.routing, t.binarize, t.eval_noise, t.dropout_rate = orders, pooling, routing, binarize, \
        eval_noise, 0.0
    block = Attention(config, (grid, grid))
    randomise(block)
    block.router.tau.fill_(0.7)
    block.train(training)
    x = torch.randn(6, 1 + grid * grid, config.hidden_size, generator=torch.Generator().manual_seed(2))
    out, _ = block(x)

    alphas = expected_alphas(x, original_weights(block.router, ROUTER_NAMES), pooling, routing, training, binarize,
                             eval_noise, 0.7, fixed_gumbels)
    x_mask = make_mask(x[:, 1:])  # no padding: all False
    # A CLS key no query is kept from, and (for the (N, N) window masks) a CLS query kept from no key.
    with_cls = [F.pad(mask, (1, 0, int(mask.shape[-2] > 1), 0), value=False) for mask in getMasks(x_mask, orders, grid)]
    weights = {f'{theirs}.{name}': getattr(getattr(block, ours), name).detach()
               for ours, theirs in BLOCK_NAMES.items() for name in ('weight', 'bias')}
    expected = original_sa_routing_block(x, weights, with_cls, alphas, heads)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_hard_routing_draws_the_original_gumbel_sample():
    """With the same seed, training-mode hard routing draws exactly the noise HardRoutingBlock draws."""
    router = Router(16, 4, 'fc', 'hard')
    randomise(router)
    router.tau.fill_(0.5)
    x = torch.randn(5, 7, 16)
    torch.manual_seed(11)
    alphas = router(x)
    torch.manual_seed(11)
    gumbels = -torch.empty(5, 4).exponential_().log()  # the original's line, for (5, 4) logits
    expected = original_routing_block(x, original_weights(router, ROUTER_NAMES), 'fc', 'hard', 0.5, gumbels, True)
    torch.testing.assert_close(alphas, expected)


def test_attention_pooling_dropout_is_where_attflat_puts_it():
    """Same seed, same dropout mask: the dropout acts after the scorer's ReLU, at the configured rate."""
    router = Router(16, 3, 'attention', 'soft', dropout_rate=0.5)
    randomise(router)
    x = torch.randn(4, 9, 16)
    torch.manual_seed(5)
    alphas = router(x)
    torch.manual_seed(5)
    expected = original_alphas(x, original_weights(router, ROUTER_NAMES), 'attention', 'soft', 1.0, None, False,
                               training=True, dropout_r=0.5)
    torch.testing.assert_close(alphas, expected)
    router.eval()
    assert not torch.allclose(router(x), alphas)  # the dropout did act in training


@pytest.mark.parametrize('grid, orders', [(5, [0, 1, 2]), (8, [1, 3, 7])])
def test_span_masks_without_cls_are_the_original_masks(grid, orders):
    n = grid * grid
    x_mask = torch.zeros(1, 1, 1, n, dtype=torch.bool)  # no padding
    original = torch.stack([mask.reshape(-1, n).expand(n, n) for mask in getMasks(x_mask, orders, grid)])
    assert torch.equal(span_masks(grid, orders, num_prefix_tokens=0), ~original)


def test_the_model_takes_dropout_and_eval_noise_from_the_config():
    config = get_config('testing')
    config.transformer.pooling, config.transformer.dropout_rate, config.transformer.eval_noise = 'attention', 0.25, True
    routers = [b.attn.router for b in VisionTransformer(config, 32, 10).transformer.encoder.layer]
    assert all(r.attention_pool.dropout.p == 0.25 and r.eval_noise for r in routers)
    del config.transformer['eval_noise']  # a config saved before the field existed
    assert not VisionTransformer(config, 32, 10).transformer.encoder.layer[0].attn.router.eval_noise


@pytest.mark.parametrize('eval_noise', [False, True])
def test_eval_noise_makes_hard_routed_evaluation_random(eval_noise):
    config = get_config('testing')
    config.transformer.routing, config.transformer.eval_noise = 'hard', eval_noise
    torch.manual_seed(0)
    model = VisionTransformer(config, 32, 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(x), model.routing_weights()
        torch.manual_seed(2)
        second = model(x), model.routing_weights()
    assert torch.equal(first[1], second[1]) != eval_noise
    assert torch.equal(first[0], second[0]) != eval_noise


def test_binarize_applies_to_soft_routing_at_evaluation():
    """SARoutingBlock binarizes whatever routing made the weights: argmax of softmax(logits) for soft routing."""
    router = Router(16, 3, 'avg', 'soft', binarize=True)
    randomise(router)
    x = torch.randn(32, 6, 16)
    training_alphas = router(x)
    assert (training_alphas > 0).all() and (training_alphas < 1).all()
    router.eval()
    assert torch.equal(router(x), argmax_binarize(training_alphas))


def old_attention_pooling_state_dict(model: VisionTransformer) -> dict:
    """The model's state dict as the earlier attention pooling saved it: `token_scores` = D -> D/2 -> 1."""
    dim = model.config.hidden_size
    state = {k: v for k, v in model.state_dict().items() if '.attention_pool.' not in k}
    for i in range(model.config.transformer.num_layers):
        prefix = f'transformer.encoder.layer.{i}.attn.router.token_scores.'
        state |= {prefix + '0.weight': torch.randn(dim // 2, dim), prefix + '0.bias': torch.randn(dim // 2),
                  prefix + '2.weight': torch.randn(1, dim // 2), prefix + '2.bias': torch.randn(1)}
    return state


@pytest.mark.parametrize('strict', [True, False])
def test_old_attention_pooling_checkpoint_is_refused_in_one_line(strict):
    config = get_config('testing')
    config.transformer.pooling = 'attention'
    model = VisionTransformer(config, 32, 10)
    with pytest.raises(ValueError, match=r"layer\.0\.attn\.router\.token_scores.*earlier attention pooling") as info:
        model.load_state_dict(old_attention_pooling_state_dict(model), strict=strict)
    assert '\n' not in str(info.value)
    model.load_state_dict(VisionTransformer(config, 32, 10).state_dict())  # a current checkpoint loads


def test_old_attention_pooling_keys_are_refused_for_loaders_that_copy_tensors():
    config = get_config('testing')
    config.transformer.pooling = 'attention'
    model = VisionTransformer(config, 32, 10)
    old = old_attention_pooling_state_dict(model)
    with pytest.raises(ValueError, match=r"layer\.0\.attn\.router\.token_scores\.\*: .*earlier attention pooling"):
        check_router_keys(old, 'attention')
    check_router_keys(model.state_dict(), 'attention')
    check_router_keys(old, 'avg')  # another pooling: an ordinary key mismatch, not this one
    router = Router(32, 2, 'attention')
    with pytest.raises(ValueError, match='earlier attention pooling'):
        router.load_state_dict({k.removeprefix('transformer.encoder.layer.0.attn.router.'): v for k, v in old.items()
                                if k.startswith('transformer.encoder.layer.0.attn.router.')})


def test_tau_policies_against_the_original_per_epoch_schedule():
    """Over as many steps as the original has epochs: `slow` is policy 0 everywhere and `fast` is policy 1
    during warm-up; after warm-up `fast` equals policy 1 exactly when tau_min = 1 / (epochs - warmup), the
    value policy 1 reaches at its last epoch (TRAR-VQA's config: 13 epochs, 3 of warm-up, 0.1)."""
    epochs, warmup, tau_max = 13, 3, 10.0
    for epoch in range(epochs):
        assert tau_at(epoch, epochs, warmup, tau_max, 0.3, 'slow') == pytest.approx(
            original_tau(epoch, 0, tau_max, 0.3, epochs, warmup))
        end = 1 / (epochs - warmup)
        assert tau_at(epoch, epochs, warmup, tau_max, end, 'fast') == pytest.approx(
            original_tau(epoch, 1, tau_max, end, epochs, warmup))
    # With another tau_min, `fast` ends there; policy 1 ignores TAU_MIN and still ends at 1 / (epochs - warmup).
    assert tau_at(epochs - 1, epochs, warmup, tau_max, 0.3, 'fast') == pytest.approx(0.3)
    assert original_tau(epochs - 1, 1, tau_max, 0.3, epochs, warmup) == pytest.approx(0.1)


def test_a_config_saved_before_eval_noise_existed_still_resumes():
    """Checkpoints written before the field existed behave as eval_noise=False, and resuming accepts them."""
    from model.config import with_added_fields
    from utils.checkpoint import check_compatible

    current = get_config('testing').to_dict()
    saved = copy.deepcopy(current)
    del saved['transformer']['eval_noise']
    with pytest.raises(ValueError, match='config.transformer.eval_noise: checkpoint None vs run False'):
        check_compatible({'config': saved}, {'config': current})
    check_compatible({'config': with_added_fields(saved)}, {'config': current})
    assert 'eval_noise' not in saved['transformer']  # the checkpoint's own dict is left as it was
