"""Synthetic checkpoints in Google's official ViT `.npz` key layout, and an independent numpy ViT.

The numpy forward pass follows the official JAX model directly from the file's arrays, so it shares
no code with `model/`.
"""
import numpy as np
from scipy.special import erf


def make_official_weights(config, img_size: int, num_classes: int, seed: int = 0,
                          pre_logits: bool = False) -> dict[str, np.ndarray]:
    """Random weights with the official key names and shapes for `config` at `img_size`."""
    rng = np.random.default_rng(seed)
    p = config.patches.size[0]
    d, heads, mlp = config.hidden_size, config.transformer.num_heads, config.transformer.mlp_dim
    n = 1 + (img_size // p) ** 2

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        'embedding/kernel': rand(p, p, 3, d), 'embedding/bias': rand(d),
        'cls': rand(1, 1, d), 'Transformer/posembed_input/pos_embedding': rand(1, n, d),
        'Transformer/encoder_norm/scale': 1 + rand(d), 'Transformer/encoder_norm/bias': rand(d),
        'head/kernel': rand(d, num_classes), 'head/bias': rand(num_classes),
    }
    if pre_logits:
        w['pre_logits/kernel'], w['pre_logits/bias'] = rand(d, d), rand(d)
    for i in range(config.transformer.num_layers):
        b = f'Transformer/encoderblock_{i}/'
        a = b + 'MultiHeadDotProductAttention_1/'
        for part in ('query', 'key', 'value'):
            w[f'{a}{part}/kernel'], w[f'{a}{part}/bias'] = rand(d, heads, d // heads), rand(heads, d // heads)
        w[f'{a}out/kernel'], w[f'{a}out/bias'] = rand(heads, d // heads, d), rand(d)
        w[f'{b}MlpBlock_3/Dense_0/kernel'], w[f'{b}MlpBlock_3/Dense_0/bias'] = rand(d, mlp), rand(mlp)
        w[f'{b}MlpBlock_3/Dense_1/kernel'], w[f'{b}MlpBlock_3/Dense_1/bias'] = rand(mlp, d), rand(d)
        for j in (0, 2):
            w[f'{b}LayerNorm_{j}/scale'], w[f'{b}LayerNorm_{j}/bias'] = 1 + rand(d), rand(d)
    return w


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_vit_logits(w: dict[str, np.ndarray], images: np.ndarray, num_layers: int,
                     use_pre_logits: bool = False) -> np.ndarray:
    """Plain ViT forward pass in float64 numpy, straight from official-layout weights (`use_pre_logits`: with
    the representation layer, Dense + tanh, between the CLS feature and the head)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    kernel = w['embedding/kernel']
    p, d = kernel.shape[0], kernel.shape[-1]
    b, c, h, wd = images.shape
    patches = images.reshape(b, c, h // p, p, wd // p, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    x = patches @ kernel.reshape(p * p * c, d) + w['embedding/bias']
    x = np.concatenate([np.broadcast_to(w['cls'], (b, 1, d)), x], axis=1)
    x = x + w['Transformer/posembed_input/pos_embedding']
    for i in range(num_layers):
        pre = f'Transformer/encoderblock_{i}/'
        att = pre + 'MultiHeadDotProductAttention_1/'
        y = _layer_norm(x, w[f'{pre}LayerNorm_0/scale'], w[f'{pre}LayerNorm_0/bias'])
        q, k, v = (np.einsum('bnd,dhk->bhnk', y, w[f'{att}{t}/kernel']) + w[f'{att}{t}/bias'][None, :, None, :]
                   for t in ('query', 'key', 'value'))
        attention = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
        x = x + np.einsum('bhnk,hkd->bnd', attention @ v, w[f'{att}out/kernel']) + w[f'{att}out/bias']
        y = _layer_norm(x, w[f'{pre}LayerNorm_2/scale'], w[f'{pre}LayerNorm_2/bias'])
        hidden = y @ w[f'{pre}MlpBlock_3/Dense_0/kernel'] + w[f'{pre}MlpBlock_3/Dense_0/bias']
        hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
        x = x + hidden @ w[f'{pre}MlpBlock_3/Dense_1/kernel'] + w[f'{pre}MlpBlock_3/Dense_1/bias']
    x = _layer_norm(x, w['Transformer/encoder_norm/scale'], w['Transformer/encoder_norm/bias'])[:, 0]
    if use_pre_logits:
        x = np.tanh(x @ w['pre_logits/kernel'] + w['pre_logits/bias'])
    return x @ w['head/kernel'] + w['head/bias']
