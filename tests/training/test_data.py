"""Datasets, transforms, the sharded sampler and the schedules."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from utils.data_utils import (Augmented, ShardedSampler, check_same_classes, class_names, collate_skipping_none,
                              digits_split, load_split)
from utils.folders import imagenet_names, scan_image_folder
from utils.images import UnreadableImage, get_eval_transform, get_train_transform, to_rgb
from utils.scheduler import build_scheduler, lr_factor, tau_at

ROOT = Path(__file__).resolve().parents[2]


def test_digits_split_is_fixed_disjoint_and_complete():
    train_x, train_y = digits_split('train')
    val_x, val_y = digits_split('val')
    assert len(train_y) + len(val_y) == 1797 and len(val_y) == 360
    again_x, _ = digits_split('val')
    assert np.array_equal(val_x, again_x)
    digits = load_digits()
    originals = {tuple(np.round(img * 255 / 16).astype(np.uint8).ravel()) for img in digits.images}
    assert {tuple(x.ravel()) for x in val_x} <= originals
    assert np.bincount(val_y).min() >= 35  # stratified: every digit is in the validation part


def test_digits_images_upscale_to_any_size():
    dataset = Augmented(load_split('digits', '', train=False), get_eval_transform(48), seed=0)
    image, label = dataset[0]
    assert image.shape == (3, 48, 48) and 0 <= label <= 9
    assert image.min() >= -1 and image.max() <= 1
    assert class_names('digits') == [str(i) for i in range(10)]


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGBA', 'CMYK', 'I;16', 'I', 'F', '1'])
def test_every_image_mode_becomes_rgb(mode):
    gray = np.linspace(0, 1, 64).reshape(8, 8)
    base = Image.fromarray((gray * 255).astype(np.uint8))
    if mode == 'I;16':
        image = Image.fromarray((gray * 65535).astype(np.uint16))
        assert image.mode == 'I;16'
    elif mode in ('I', 'F'):
        image = Image.fromarray((gray * 255).astype(np.int32 if mode == 'I' else np.float32), mode=mode)
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == 'RGB' and rgb.size == (8, 8)
    if mode not in ('1', 'P', 'CMYK'):
        np.testing.assert_allclose(np.asarray(rgb)[..., 0], np.asarray(base), atol=1)


def test_augmentation_depends_on_seed_epoch_and_index_only():
    source = load_split('digits', '', train=True)
    dataset = Augmented(source, get_train_transform(32, 'flip'), seed=3)
    first = dataset[5][0]
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(dataset[5][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5][0], first)
    other_seed = Augmented(source, get_train_transform(32, 'flip'), seed=4)
    assert not torch.equal(other_seed[5][0], first)


class HalfWhite:
    """One image, white on its left half and black on its right: a mirrored crop shows up as white on the right."""
    classes = ['0']

    def __len__(self):
        return 64

    def load(self, index):
        pixels = np.zeros((32, 32), dtype=np.uint8)
        pixels[:, :16] = 255
        return Image.fromarray(pixels), 0


def left_minus_right(image: torch.Tensor) -> float:
    return float(image[:, :, :16].mean() - image[:, :, 16:].mean())


def test_crop_augmentation_crops_but_never_mirrors():
    crop = Augmented(HalfWhite(), get_train_transform(32, 'crop'), seed=0)
    flip = Augmented(HalfWhite(), get_train_transform(32, 'flip'), seed=0)
    crops = [left_minus_right(crop[i][0]) for i in range(64)]
    assert min(crops) >= 0 and len(set(round(c, 4) for c in crops)) > 10  # random crops, none mirrored
    assert min(left_minus_right(flip[i][0]) for i in range(64)) < 0  # flips do mirror some
    with pytest.raises(ValueError, match="augment 'mirror'"):
        get_train_transform(32, 'mirror')


def test_batches_do_not_depend_on_worker_count():
    dataset = Augmented(load_split('digits', '', train=True), get_train_transform(16, 'flip'), seed=0)
    sampler = ShardedSampler(len(dataset), 16, rank=0, world_size=1, seed=0)

    def batches(workers):
        loader = DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=workers,
                            collate_fn=collate_skipping_none)
        return [images for images, _, _ in loader][:6]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def test_sharded_sampler_splits_each_global_batch_across_processes():
    size, global_batch = 103, 12
    single = list(ShardedSampler(size, global_batch, 0, 1, seed=7))
    shards = [list(ShardedSampler(size, global_batch, r, 3, seed=7)) for r in range(3)]
    assert len(single) == (size // global_batch) * global_batch and len(set(single)) == len(single)
    for step in range(size // global_batch):
        union = sorted(i for shard in shards for i in shard[step * 4:(step + 1) * 4])
        assert union == sorted(single[step * 12:(step + 1) * 12])
    resumed = ShardedSampler(size, global_batch, 1, 3, seed=7)
    resumed.set_epoch(0, start=8)
    assert list(resumed) == shards[1][8:] and len(resumed) == len(shards[1]) - 8
    resumed.set_epoch(1)
    assert list(resumed) != shards[1]
    with pytest.raises(ValueError, match='fewer than one global batch'):
        ShardedSampler(10, 16, 0, 1, seed=0)


def test_imagefolder_reports_or_skips_corrupt_files(tmp_path):
    for name in ('cat', 'dog'):
        (tmp_path / 'train' / name).mkdir(parents=True)
        Image.new('RGB', (10, 10), 'red').save(tmp_path / 'train' / name / 'ok.png')
    png = (tmp_path / 'train' / 'dog' / 'ok.png').read_bytes()
    (tmp_path / 'train' / 'dog' / 'broken.png').write_bytes(png[:len(png) // 2])
    strict = Augmented(load_split('imagenet', str(tmp_path), train=True), get_eval_transform(8), seed=0)
    assert strict.classes == ['cat', 'dog']
    with pytest.raises(UnreadableImage, match=r'broken\.png: .*\(use --skip_corrupt to skip such files\)$'):
        [strict[i] for i in range(len(strict))]
    lenient = Augmented(load_split('imagenet', str(tmp_path), train=True, skip_corrupt=True),
                        get_eval_transform(8), seed=0)
    images, labels, skipped = collate_skipping_none([lenient[i] for i in range(len(lenient))])
    broken = lenient.source.samples.index((str(tmp_path / 'train' / 'dog' / 'broken.png'), 1))
    assert skipped == [broken] and images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]


def test_decompression_bombs_are_reported_or_skipped_like_corrupt_files(tmp_path, monkeypatch):
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    Image.new('RGB', (10, 10)).save(tmp_path / 'train' / 'cat' / 'huge.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10)  # 100 pixels: over twice the limit, a bomb
    with pytest.raises(UnreadableImage, match=r'huge\.png: .*decompression bomb'):
        Augmented(load_split('imagenet', str(tmp_path), train=True), get_eval_transform(8), seed=0)[0]
    lenient = Augmented(load_split('imagenet', str(tmp_path), train=True, skip_corrupt=True), get_eval_transform(8), 0)
    assert lenient[0] == (0,) and collate_skipping_none([lenient[0]], (3, 8, 8))[0].shape == (0, 3, 8, 8)


def test_splits_of_other_class_folders_are_refused(tmp_path):
    for split, names in (('train', ('cat', 'dog')), ('val', ('ant', 'cat', 'dog'))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new('RGB', (4, 4)).save(tmp_path / split / name / 'a.png')
    train, val = (load_split('imagenet', str(tmp_path), train=split == 'train') for split in ('train', 'val'))
    only_in_val = rf"has 3 classes and .* 2: .* but 'ant' is only in {re.escape(str(tmp_path / 'val'))}$"
    with pytest.raises(ValueError, match=only_in_val):
        check_same_classes(train, val)
    check_same_classes(train, train)
    check_same_classes(load_split('digits', '', train=True), load_split('digits', '', train=False))


def test_imagenet_wnid_folders_get_readable_names(tmp_path):
    wnids = (ROOT / 'utils' / 'imagenet_wnids.txt').read_text().split()
    names = imagenet_names(wnids)
    assert len(names) == 1000 and names[0] == 'tench' and names[1] == 'goldfish'
    assert dict(zip(wnids, names))['n15075141'] == 'toilet tissue'  # the standard last class
    lookalikes = [f'n{i:08d}' for i in range(1000)]  # 1000 WordNet-id-shaped folders that are not ImageNet-1k
    assert imagenet_names(lookalikes) == lookalikes
    assert imagenet_names(['cat', 'dog']) == ['cat', 'dog']
    for split in ('train', 'val'):
        for name in ('n01440764', 'n01443537'):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new('RGB', (4, 4)).save(tmp_path / split / name / 'a.png')
    assert class_names('imagenet', str(tmp_path)) == ['n01440764', 'n01443537']  # not the 1000-class set


def test_missing_datasets_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match='train'):
        load_split('imagenet', str(tmp_path), train=True)
    with pytest.raises(ValueError, match='mnist'):
        load_split('mnist', str(tmp_path), train=True)


def test_offline_cifar_says_which_folder_and_where_to_get_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    for name in ('CIFAR10', 'CIFAR100'):
        stand_in = type(name, (), {'__init__': offline, 'url': f'https://{name}.tar.gz'})
        monkeypatch.setattr(f'torchvision.datasets.{name}', stand_in)
    with pytest.raises(FileNotFoundError) as error:
        load_split('cifar10', str(tmp_path), train=True)
    message = str(error.value)
    assert str(tmp_path / 'cifar-10-batches-py') in message and 'https://CIFAR10.tar.gz' in message
    with pytest.raises(FileNotFoundError, match='cifar-100-python'):
        load_split('cifar100', str(tmp_path), train=False)
    assert class_names('cifar10', str(tmp_path)) == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                                                     'horse', 'ship', 'truck']  # no download needed
    with pytest.raises(FileNotFoundError, match='cifar-100-python'):
        class_names('cifar100', str(tmp_path))


def test_lr_schedule_warmup_then_decay():
    assert lr_factor(0, 10, 110, 'cosine') == 0 and lr_factor(5, 10, 110, 'cosine') == 0.5
    assert lr_factor(10, 10, 110, 'cosine') == 1 and lr_factor(110, 10, 110, 'cosine') == pytest.approx(0)
    assert lr_factor(60, 10, 110, 'cosine') == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(60, 10, 110, 'linear') == pytest.approx(0.5)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.2)
    scheduler = build_scheduler(optimizer, 'linear', 2, 4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.1, 0.2, 0.1])
    with pytest.raises(ValueError, match='step'):
        build_scheduler(optimizer, 'step', 2, 4)


def test_tau_policies():
    # 101 steps (0..100): the ramps end at the last step, 100.
    assert tau_at(0, 101, 10, 10.0, 0.1, 'slow') == 10.0
    assert tau_at(50, 101, 10, 10.0, 0.1, 'slow') == pytest.approx(5.05)
    assert tau_at(100, 101, 10, 10.0, 0.1, 'slow') == pytest.approx(0.1)
    assert tau_at(5, 101, 10, 10.0, 0.1, 'fast') == pytest.approx(5.5)
    assert tau_at(10, 101, 10, 10.0, 0.1, 'fast') == pytest.approx(1.0)
    assert tau_at(55, 101, 10, 10.0, 0.1, 'fast') == pytest.approx(0.55)
    assert tau_at(100, 101, 10, 10.0, 0.1, 'fast') == pytest.approx(0.1)
    assert tau_at(0, 101, 10, 10.0, 0.1, 'finetune') == pytest.approx(1.0)
    assert tau_at(50, 101, 10, 10.0, 0.1, 'finetune') == pytest.approx(0.55)
    assert tau_at(100, 101, 10, 10.0, 0.1, 'finetune') == pytest.approx(0.1)
    slow = [tau_at(s, 101, 10, 10.0, 0.1, 'slow') for s in range(101)]
    assert all(a > b for a, b in zip(slow, slow[1:]))
    with pytest.raises(ValueError, match='quick'):
        tau_at(0, 10, 1, 10.0, 0.1, 'quick')


def image_tree_of_pngs(root: Path, classes=('cat', 'dog'), per_class=3) -> Path:
    for name in classes:
        (root / name / 'nested').mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (4, 4)).save(root / name / ('nested' if i else '.') / f'{i}.png')
    return root


def test_the_scan_stats_folders_and_links_only(tmp_path, monkeypatch):
    import os
    split = image_tree_of_pngs(tmp_path / 'train')
    os.link(split / 'cat' / '0.png', split / 'cat' / 'nested' / 'hard.png')  # one file, two names: one sample
    os.symlink(split / 'cat' / 'nested' / '1.png', split / 'cat' / 'soft.png')
    real_stat, stats = os.stat, []
    monkeypatch.setattr(os, 'stat', lambda path, *a, **k: stats.append(str(path)) or real_stat(path, *a, **k))
    folders, samples = scan_image_folder(split)
    monkeypatch.setattr(os, 'stat', real_stat)
    assert folders == ['cat', 'dog'] and len(samples) == 6
    # independently: every path stat-ed and counted once by (device, inode)
    ids = {(os.stat(p).st_dev, os.stat(p).st_ino): label for p, label in samples}
    assert len(ids) == 6
    assert not [path for path in stats if path.endswith('.png') and 'soft' not in path and '1.png' not in path]


def test_the_cached_file_list_is_used_until_a_folder_changes(tmp_path, monkeypatch):
    from utils import folders as folder_scan
    split = image_tree_of_pngs(tmp_path / 'train')
    cache = tmp_path / 'run' / 'train_files.txt'
    cache.parent.mkdir()
    expected = scan_image_folder(split)
    assert scan_image_folder(split, cache) == expected and cache.exists()

    def no_walk(*args):
        raise AssertionError('walked although the cached list is valid')
    monkeypatch.setattr(folder_scan._FolderScan, 'walk', no_walk)
    assert scan_image_folder(split, cache) == expected
    monkeypatch.undo()
    Image.new('RGB', (4, 4)).save(split / 'dog' / 'nested' / 'new.png')  # a nested folder changes
    folders, samples = scan_image_folder(split, cache)
    assert len(samples) == len(expected[1]) + 1
    assert folder_scan.read_file_list(cache, split) == (folders, samples)
    foreign = tmp_path / 'notes.txt'
    foreign.write_text('mine')
    assert scan_image_folder(split, foreign) == (folders, samples) and foreign.read_text() == 'mine'
