"""The recipes' parts against timm itself: parameter groups and lr scales, the lr schedule, drop path, mixup and
cutmix, RandAugment seeding, EMA; the recipes' flags and their one-line errors."""
import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from model.config import get_config
from model.modeling import VisionTransformer
from model.pretrained import _from_state_dict, load_into, own_names
from utils.augment import BatchMixup, build_mixup, recipe_train_transform, step_seed, train_loss
from utils.data_utils import Augmented, DigitsDataset
from utils.optim import build_ema, build_optimizer
from utils.recipes import RECIPES, add_recipe_arguments, resolve
from utils.scheduler import build_scheduler

DEPTH = 3


def tiny_timm(drop_path_rate: float = 0.0) -> TimmViT:
    """timm's ViT with the `testing` config's shape (32 px, patch 4, width 32, 2 heads, MLP 64), 3 blocks."""
    return TimmViT(img_size=32, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, mlp_ratio=2.0,
                   num_classes=10, drop_path_rate=drop_path_rate, global_pool='token')


def tiny_ours(orders=(), drop_path_rate: float = 0.0) -> VisionTransformer:
    config = get_config('testing')
    config.transformer.num_layers = DEPTH
    config.transformer.orders = list(orders)
    config.transformer.dropout_rate = 0.0
    return VisionTransformer(config, img_size=32, num_classes=10, drop_path_rate=drop_path_rate)


def timm_names() -> dict[str, str]:
    """Our parameter name -> timm's (the qkv parameters are three of ours), from the checkpoint adapter's names."""
    return {ours: theirs for theirs in tiny_timm().state_dict() for ours in own_names(theirs)}


def group_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float, float]]:
    """Parameter name -> (weight decay, lr scale, lr) of its group."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)]: (group['weight_decay'], group.get('lr_scale', 1.0), group['lr'])
            for group in optimizer.param_groups for p in group['params']}


@pytest.mark.parametrize('opt,weight_decay,layer_decay', [('adamw', 0.05, None), ('adamw', 0.05, 0.65),
                                                          ('sgd', 1e-4, 0.75), ('lamb', 0.0, 0.5)])
def test_parameter_groups_equal_timms_on_a_timm_vit_with_the_same_weights(opt, weight_decay, layer_decay):
    timm_model = tiny_timm()
    ours = tiny_ours()
    load_into(ours, _from_state_dict(Path('timm'), timm_model.state_dict()), head=True, routers=False)
    for name, tensor in ours.state_dict().items():  # the same weights, through the adapter
        if name in timm_names() and name.endswith(('fc1.weight', 'cls_token', 'position_embeddings')):
            assert torch.equal(tensor, timm_model.state_dict()[timm_names()[name]])
    lr = 1e-3
    theirs = group_of(create_optimizer_v2(
        timm_model, opt, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay), timm_model)
    mine = group_of(build_optimizer(ours, opt, lr, weight_decay, 'timm', layer_decay), ours)
    assert set(mine) == set(dict(ours.named_parameters()))
    names = timm_names()
    for name, (decay, scale, group_lr) in mine.items():
        their_decay, their_scale, _ = theirs[names[name]]
        assert (decay, scale) == pytest.approx((their_decay, their_scale), rel=1e-12), name
        assert group_lr == pytest.approx(lr * their_scale, rel=1e-12), name  # the scale applied to the group's lr
    if layer_decay is not None:  # a real depth: the embeddings' scale is layer_decay^(depth + 1)
        assert mine['transformer.embeddings.cls_token'][1] == pytest.approx(layer_decay ** (DEPTH + 1))


def test_routers_take_their_blocks_layer_and_decay_like_linears():
    model = tiny_ours(orders=(0, 1))
    groups = group_of(build_optimizer(model, 'adamw', 1e-3, 0.05, 'timm', 0.65), model)
    for name, (decay, scale, _) in groups.items():
        if '.attn.router.' in name:
            block = name.split('.attn.')[0]
            assert scale == groups[f'{block}.attention_norm.weight'][1], name
            parameter = dict(model.named_parameters())[name]
            assert decay == (0.05 if parameter.ndim > 1 else 0.0), name


@pytest.mark.parametrize('weight_decay,layer_decay', [(0.05, 0.65), (0.05, None)])
def test_timm_model_groups_equal_timms_and_routers_take_their_blocks_layer(weight_decay, layer_decay):
    """--model_type timm:<name>: the routed TimmViT's groups are timm's on the same timm ViT without routers."""
    from model.timm_trar import TimmViT, timm_config
    import timm
    torch.manual_seed(0)
    ours = TimmViT(timm_config('timm:vit_tiny_patch16_224', [0, 1]), img_size=32, num_classes=5)
    plain = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=5)
    lr = 1e-3
    theirs = group_of(create_optimizer_v2(plain, 'adamw', lr=lr, weight_decay=weight_decay,
                                          layer_decay=layer_decay), plain)
    mine = group_of(build_optimizer(ours, 'adamw', lr, weight_decay, 'timm', layer_decay), ours)
    assert set(mine) == set(dict(ours.named_parameters()))
    routers = [name for name in mine if '.attn.router.' in name]
    assert {name.split('.attn.')[0] for name in routers} == {f'vit.blocks.{i}' for i in range(12)}
    for name, (decay, scale, group_lr) in mine.items():
        parameter = dict(ours.named_parameters())[name]
        if name in routers:  # its block's layer; its weight decays, its bias does not
            their_decay, their_scale = weight_decay if parameter.ndim > 1 else 0.0, \
                theirs[name.split('.attn.')[0].removeprefix('vit.') + '.norm1.weight'][1]
        else:
            their_decay, their_scale, _ = theirs[name.removeprefix('vit.')]
        assert (decay, scale) == pytest.approx((their_decay, their_scale), rel=1e-12), name
        assert group_lr == pytest.approx(lr * their_scale, rel=1e-12), name
    assert mine['vit.cls_token'][0] == mine['vit.pos_embed'][0] == 0.0  # timm's no_weight_decay()
    if layer_decay is not None:  # a real depth: embeddings at layer 0, block i at i + 1, the head at 13
        assert mine['vit.pos_embed'][1] == pytest.approx(layer_decay ** 13) and mine['vit.head.weight'][1] == 1.0
        assert mine['vit.blocks.3.attn.router.mlp.0.weight'][1] == pytest.approx(layer_decay ** 9)


def test_vit_recipe_optimizer_is_the_original_sgd_bit_for_bit():
    torch.manual_seed(0)
    model, reference = tiny_ours(), tiny_ours()
    reference.load_state_dict(model.state_dict())
    vit = RECIPES['vit']
    mine = build_optimizer(model, vit['opt'], 0.1, 1e-3, vit['wd_exclude'], vit['layer_decay'])
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert len(mine.param_groups) == 1 and mine.state_dict()['param_groups'][0]['params'] == \
        theirs.state_dict()['param_groups'][0]['params']
    images = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        for net, optimizer in ((model, mine), (reference, theirs)):
            torch.manual_seed(1)
            net(images).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize('warmup_lr,min_lr,layer_decay', [(1e-6, 1e-5, None), (0.0, 1e-6, 0.65)])
def test_lr_schedule_equals_timms_cosine_scheduler_per_group(warmup_lr, min_lr, layer_decay):
    lr, warmup, total = 1e-3, 4, 20
    ours, theirs = tiny_ours(), tiny_ours()
    mine = build_optimizer(ours, 'adamw', lr, 0.05, 'timm', layer_decay)
    schedule = build_scheduler(mine, 'cosine', warmup, total, warmup_lr / lr, min_lr / lr)
    reference = create_optimizer_v2(theirs, 'adamw', lr=lr, weight_decay=0.05,
                                                            layer_decay=layer_decay)
    timm_schedule = CosineLRScheduler(reference, t_initial=total - warmup, lr_min=min_lr, warmup_t=warmup,
                                      warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)
    for step in range(total):
        timm_schedule.step_update(step)
        assert [g['lr'] for g in mine.param_groups] == pytest.approx([g['lr'] for g in reference.param_groups],
                                                                   rel=1e-9, abs=1e-15), step
        mine.step()
        schedule.step()


def test_vit_schedule_is_the_original_bit_for_bit():
    from utils.scheduler import lr_factor
    model = tiny_ours()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    schedule = build_scheduler(optimizer, 'cosine', 3, 10, 0.0, 0.0)
    for step in range(10):
        assert optimizer.param_groups[0]['lr'] == 0.03 * lr_factor(step, 3, 10, 'cosine')
        optimizer.step()
        schedule.step()


def test_drop_path_rates_and_training_forward_equal_timms():
    timm_model, ours = tiny_timm(drop_path_rate=0.3), tiny_ours(drop_path_rate=0.3)
    load_into(ours, _from_state_dict(Path('timm'), timm_model.state_dict()), head=True, routers=False)
    theirs = [(b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.0) for b in timm_model.blocks]
    mine = [(b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0)
            for b in ours.transformer.encoder.layer]
    assert mine == theirs and mine[-1] == pytest.approx(0.3) and mine[0] == 0.0
    images = torch.randn(8, 3, 32, 32)
    timm_model.train(), ours.train()
    torch.manual_seed(3)
    expected = timm_model(images)
    torch.manual_seed(3)
    got = ours(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # the same blocks dropped for the same seed
    torch.manual_seed(4)
    assert not torch.allclose(ours(images), got)  # and the drops are random


def test_no_drop_path_keeps_the_block_as_before():
    model = tiny_ours()
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in model.transformer.encoder.layer)
    with pytest.raises(ValueError, match='drop_path_rate 1.0'):
        tiny_ours(drop_path_rate=1.0)


MIXES = [dict(mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1),
         dict(mixup=0.8, cutmix=0.0, prob=1.0, switch_prob=0.5, smoothing=0.0),
         dict(mixup=0.0, cutmix=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1),
         dict(mixup=0.8, cutmix=1.0, prob=0.5, switch_prob=0.5, smoothing=0.1)]


@pytest.mark.parametrize('mix', MIXES)
def test_mixup_images_and_targets_equal_timms_for_the_same_seed(mix):
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    ours = BatchMixup(mix['mixup'], mix['cutmix'], mix['prob'], mix['switch_prob'], mix['smoothing'], 10, seed=7)
    timm_mixup = Mixup(mixup_alpha=mix['mixup'], cutmix_alpha=mix['cutmix'], prob=mix['prob'],
                       switch_prob=mix['switch_prob'], label_smoothing=mix['smoothing'], num_classes=10)
    np.random.seed(123)
    for step in range(8):
        outside = np.random.get_state()[1].copy()
        mixed, targets = ours(images.clone(), labels, step)
        assert np.array_equal(np.random.get_state()[1], outside)  # the global numpy state is left alone
        np.random.seed(step_seed(7, step))
        expected_images, expected_targets = timm_mixup(images.clone(), labels)
        assert torch.equal(mixed, expected_images) and torch.equal(targets, expected_targets)


def lam_of(targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image's weight of its own label in mixup targets (no smoothing), from the targets alone."""
    return targets.gather(1, labels[:, None])[:, 0]


def test_mixup_draws_depend_on_the_step_not_on_the_split():
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8)
    ours = BatchMixup(0.8, 1.0, 1.0, 0.5, 0.0, 10, seed=1)
    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=10)
    for step in range(6):
        lams = {}
        for micro in (8, 4, 2):  # 1x8, 2x4 (two processes or accumulation steps), 4x2
            parts = [ours(images[i:i + micro].clone(), labels[i:i + micro], step) for i in range(0, 8, micro)]
            lams[micro] = torch.cat([lam_of(t, labels[i * micro:(i + 1) * micro]) for i, (_, t) in enumerate(parts)])
            for i, (mixed, targets) in enumerate(parts):  # each micro-batch is timm's mixing of that micro-batch
                np.random.seed(step_seed(1, step))
                expected, expected_targets = timm_mixup(images[i * micro:(i + 1) * micro].clone(),
                                                        labels[i * micro:(i + 1) * micro])
                assert torch.equal(mixed, expected) and torch.equal(targets, expected_targets)
        # one lambda for the whole step, whatever the split (the partners differ: i with n-1-i in each part)
        assert torch.equal(lams[8], lams[4]) and torch.equal(lams[4], lams[2])
        assert torch.unique(lams[8]).numel() == 1


def test_an_odd_micro_batch_mixes_all_but_its_last_image():
    images, labels = torch.randn(5, 3, 8, 8), torch.arange(5)
    mixed, targets = BatchMixup(0.8, 0.0, 1.0, 0.5, 0.1, 10, seed=0)(images.clone(), labels, 0)
    assert torch.equal(mixed[4], images[4])
    assert targets[4].argmax() == 4 and targets[4].max() == pytest.approx(0.91)
    assert not torch.equal(mixed[:4], images[:4])


def test_mixing_needs_an_even_micro_batch_and_soft_targets_get_the_soft_loss():
    with pytest.raises(ValueError, match='micro-batches of 1 images'):
        build_mixup(0.8, 1.0, 1.0, 0.5, 0.1, 10, seed=0, micro_batch=1)
    assert build_mixup(0.0, 0.0, 1.0, 0.5, 0.1, 10, seed=0, micro_batch=1) is None
    logits, targets = torch.randn(4, 10, dtype=torch.float64), torch.softmax(torch.randn(4, 10), -1).double()
    expected = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()  # float64 formula
    torch.testing.assert_close(train_loss(True, 0.1)(logits, targets), expected)
    labels = torch.tensor([1, 2, 3, 4])
    smoothed = torch.full((4, 10), 0.01, dtype=torch.float64).scatter_(1, labels[:, None], 0.91)
    torch.testing.assert_close(train_loss(False, 0.1)(logits, labels),
                               -(smoothed * torch.log_softmax(logits, -1)).sum(-1).mean())


def test_randaugment_and_erasing_are_a_function_of_seed_epoch_and_index():
    transform = recipe_train_transform(32, 'flip', 'rand-m9-mstd0.5-inc1', 0.25)
    data = Augmented(DigitsDataset('train'), transform, seed=0)
    random.seed(5)
    first = [data[i][0] for i in range(6)]
    random.seed(99)  # the caller's global states do not matter, and are left as they were
    np.random.seed(99)
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    again = [data[i][0] for i in range(6)]
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    data.set_epoch(1)
    assert not all(torch.equal(a, data[i][0]) for i, a in enumerate(first))
    assert first[0].shape == (3, 32, 32)


def test_randaugment_is_timms_transform_seeded():
    from timm.data import create_transform
    from utils.augment import SeededTransform
    transform = recipe_train_transform(32, 'flip', 'rand-m9-mstd0.5-inc1', 0.25)
    assert isinstance(transform, SeededTransform)
    image = DigitsDataset('train').load(0)[0].convert('RGB')
    torch.manual_seed(11)
    got = transform(image)
    torch.manual_seed(11)
    seed = int(torch.randint(2 ** 31 - 1, (1,)).item())
    random.seed(seed)
    np.random.seed(seed)
    expected = create_transform(32, is_training=True, hflip=0.5, color_jitter=None, interpolation='bicubic',
                                auto_augment='rand-m9-mstd0.5-inc1', mean=(0.5,) * 3, std=(0.5,) * 3, re_prob=0.25,
                                re_mode='pixel')(image)
    assert torch.equal(got, expected)


@pytest.mark.parametrize('magnitude, bits', [(10, 0), (9, 1), (5, 2), (0, 4)])
def test_randaugment_posterize_keeps_any_bits_rand_m9_mstd_draws(magnitude, bits):
    """`inc1` posterize at magnitude 10 keeps 0 bits, which Pillow 13 refuses; the result is the bit mask."""
    from timm.data.auto_augment import AugmentOp
    image = DigitsDataset('train').load(0)[0].convert('RGB')
    got = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=magnitude)(image)
    pixels = np.asarray(image)
    assert np.array_equal(np.asarray(got), pixels & (0xFF << (8 - bits) & 0xFF)) and pixels.max() > 0


def test_ema_weights_equal_timms_ema_step_by_step():
    torch.manual_seed(0)
    model = tiny_ours(orders=(0, 1))
    ema, reference = build_ema(model, 0.9), ModelEmaV3(model, decay=0.9, exclude_buffers=True)
    average = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 5):  # steps done, as train.py (and timm's train.py) passes them
        sum(p.square().sum() * torch.rand(()) for p in model.parameters()).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.set_tau(2.0 - step * 0.3)
        ema.update(model, step=step)
        reference.update(model, step=step)
        decay = 0.0 if step == 1 else 0.9  # timm's ModelEmaV3 copies the weights of the first step
        for name, p in model.named_parameters():
            average[name] = decay * average[name] + (1 - decay) * p.detach().double()  # the float64 formula
        for (name, mine), theirs in zip(ema.module.named_parameters(), reference.module.parameters()):
            assert torch.equal(mine, theirs), name
            torch.testing.assert_close(mine.double(), average[name], rtol=1e-6, atol=1e-7)
        taus = [b.attn.router.tau.item() for b in ema.module.transformer.encoder.layer]
        assert taus == [pytest.approx(2.0 - step * 0.3)] * DEPTH  # buffers copied: the live temperature


def parse(*argv: str) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    args = parser.parse_args(list(argv))
    return args, resolve(args)


def test_a_flag_overrides_the_recipe_and_the_override_is_reported():
    args, overrides = parse('--recipe', 'deit', '--drop_path', '0.2', '--model_ema', 'false', '--opt', 'adamw')
    assert args.drop_path == 0.2 and args.model_ema is False and args.mixup == RECIPES['deit']['mixup']
    assert overrides == {'drop_path': (0.1, 0.2), 'model_ema': (True, False)}  # --opt adamw is deit's own value
    args, overrides = parse()
    assert args.recipe == 'vit' and overrides == {} and all(getattr(args, k) == v for k, v in RECIPES['vit'].items())


@pytest.mark.parametrize('argv,message', [
    (('--drop_path', '-0.1'), '--drop_path -0.1: expected a probability'),
    (('--learning_rate', '-1'), '--learning_rate -1.0: expected a non-negative number'),
    (('--recipe', 'deit', '--aa', 'rand-x9'), "--aa 'rand-x9': not an auto-augment string timm knows"),
    (('--aa', 'bogus'), "--aa 'bogus': not an auto-augment string"),
    (('--opt', 'adamx'), "--opt 'adamx': expected an optimizer timm knows"),
    (('--layer_decay', '1.5'), '--layer_decay 1.5: expected a factor in'),
    (('--model_ema_decay', '1'), '--model_ema_decay 1.0: expected a decay in'),
])
def test_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(ValueError) as error:
        parse(*argv)
    assert message in str(error.value) and '\n' not in str(error.value)
