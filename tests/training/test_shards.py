"""Tar shards (scripts/make_shards.py) read with webdataset: each image once over processes and workers, the
pixels of the folder reader, deterministic and resumable writing, one-line errors for damaged shards."""
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from utils.data_utils import Augmented, collate_skipping_none, load_split
from utils.images import Skipped, UnreadableImage, eval_pixels, train_pixels
from utils.shards import ShardImages

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'scripts'))
import make_shards  # noqa: E402


def digits_tree(root: Path, count: int = 40) -> Path:
    """`count` of scikit-learn's digits as PNGs (and a few JPEGs of tiny generated images) in class folders."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i in range(count):
        folder = root / 'train' / f'digit{digits.target[i]}'
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        if i % 5:
            Image.fromarray(pixels).save(folder / f'{i}.png')
        else:
            Image.fromarray(np.stack([pixels] * 3, -1)).resize((24, 20)).save(folder / f'{i}.jpg', quality=90)
    return root


def shard(root: Path, out: Path, size: int = 7) -> list[Path]:
    return make_shards.main(['--data_dir', str(root), '--split', 'train', '--out', str(out), '--shard_size', str(size)])


def indices(dataset, workers: int) -> list[int]:
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=lambda batch: batch)
    return [item.index if isinstance(item, Skipped) else int(item[0][0, 0, 0]) for batch in loader for item in batch]


def test_every_image_is_read_once_over_processes_and_workers(tmp_path):
    root = digits_tree(tmp_path / 'data')
    paths = shard(root, tmp_path / 'shards')
    assert len(paths) == 6  # 40 images, 7 a shard
    folder = Augmented(load_split('imagenet', str(root), train=True), eval_pixels(8), seed=0)
    pattern = str(tmp_path / 'shards' / 'train-{000000..000005}.tar')
    shards = ShardImages(pattern, eval_pixels(8))
    assert shards.classes == folder.classes and len(shards) == 40
    keys = sorted(tuple(image.flatten().tolist()) + (label,) for image, label in (folder[i] for i in range(40)))
    for world in (1, 2, 4):
        for workers in (0, 2):
            seen = []
            for rank in range(world):
                loader = DataLoader(ShardImages(pattern, eval_pixels(8), rank=rank, world_size=world),
                                    batch_size=4, num_workers=workers, collate_fn=lambda batch: batch)
                seen += [tuple(image.flatten().tolist()) + (label,) for batch in loader for image, label in batch]
            assert sorted(seen) == keys, (world, workers)  # the folder's images and labels, each once
    glob_pattern = ShardImages(str(tmp_path / 'shards' / 'train-*.tar'), eval_pixels(8))
    assert glob_pattern.urls == shards.urls


def test_training_pixels_depend_on_the_image_not_on_the_split(tmp_path):
    paths = shard(digits_tree(tmp_path / 'data'), tmp_path / 'shards')
    pattern = str(tmp_path / 'shards' / 'train-*.tar')

    def images(world, workers):
        found = {}
        for rank in range(world):
            data = ShardImages(pattern, train_pixels(12, 'flip'), seed=3, rank=rank, world_size=world)
            data.set_epoch(2)
            loader = DataLoader(data, batch_size=5, num_workers=workers, collate_fn=lambda batch: batch)
            for batch in loader:
                for image, label in batch:
                    found.setdefault(label, []).append(image)
        return {label: sorted(tuple(i.flatten().tolist()) for i in group) for label, group in found.items()}
    assert images(1, 0) == images(2, 2) and len(paths) == 6


def test_shards_are_deterministic_resumable_and_never_replace_other_files(tmp_path, capsys):
    root = digits_tree(tmp_path / 'data', count=20)
    first = [p.read_bytes() for p in shard(root, tmp_path / 'a')]
    assert [p.read_bytes() for p in shard(root, tmp_path / 'b')] == first
    (tmp_path / 'a' / 'train-000001.tar').unlink()  # an interrupted run: shard 1 was never renamed into place
    capsys.readouterr()
    assert [p.read_bytes() for p in shard(root, tmp_path / 'a')] == first
    assert capsys.readouterr().out.count('wrote') == 1  # only the missing shard
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'train-000000.tar').write_text('my notes')
    with pytest.raises(FileExistsError, match=r'train-000000\.tar exists and is not shard 0 of this plan'):
        shard(root, tmp_path / 'c')
    assert (tmp_path / 'c' / 'train-000000.tar').read_text() == 'my notes'
    with pytest.raises(FileExistsError, match='not shard 0 of this plan'):
        shard(root, tmp_path / 'a', size=5)  # another plan into the same folder


def rewrite(path: Path, edit) -> None:
    """Rewrite a shard with `edit(name, data)` -> (name, data) or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, 'w') as tar:
        for name, data in members:
            kept = edit(name, data)
            if kept is not None:
                info = tarfile.TarInfo(kept[0])
                info.size = len(kept[1])
                tar.addfile(info, io.BytesIO(kept[1]))


def test_damaged_shards_are_named_in_one_line_or_skipped(tmp_path):
    paths = shard(digits_tree(tmp_path / 'data', count=21), tmp_path / 'shards')
    pattern = str(tmp_path / 'shards' / 'train-*.tar')
    whole, whole1 = paths[0].read_bytes(), paths[1].read_bytes()
    paths[0].write_bytes(whole[:len(whole) // 2])  # truncated
    rewrite(paths[1], lambda name, data: None if name == '000000008.cls' else (name, data))  # no class index
    rewrite(paths[2], lambda name, data: (name, data[:40]) if name.startswith('000000015.') and
            not name.endswith('.cls') else (name, data))  # an unreadable image

    def read(skip):
        return indices(ShardImages(pattern, eval_pixels(8), skip_corrupt=skip), workers=0)
    with pytest.raises(UnreadableImage, match=r'train-000000\.tar is damaged or truncated .*: images \d+ to 6 are '
                                              r'lost \(use --skip_corrupt'):
        read(False)
    paths[0].write_bytes(whole)
    with pytest.raises(UnreadableImage, match=r"train-000001\.tar: sample 000000008 has \['png'\]; expected one "
                                              r"image and its class index"):
        read(False)
    paths[1].write_bytes(whole1)
    with pytest.raises(UnreadableImage, match=r'cannot read image .*train-000002\.tar:000000015\.\w+: '):
        read(False)
    rewrite(paths[1], lambda name, data: None if name == '000000008.cls' else (name, data))
    paths[0].write_bytes(whole[:len(whole) // 2])
    dataset = ShardImages(pattern, eval_pixels(8), skip_corrupt=True)
    items = [item for item in dataset]
    skipped = sorted(item.index for item in items if isinstance(item, Skipped))
    assert len(items) == 21 and skipped[-2:] == [8, 15]  # every image once, read or skipped; the two bad samples
    assert 0 < skipped[0] and skipped[:-2] == list(range(skipped[0], 7))  # and the lost tail of shard 0
    with pytest.raises(FileNotFoundError, match='no shards match'):
        ShardImages(str(tmp_path / 'none-*.tar'), eval_pixels(8))


def test_eval_py_on_shards_counts_each_image_once_as_on_the_folder(tmp_path):
    import importlib.util
    from model.config import get_config, parse_orders
    from model.modeling import VisionTransformer
    spec = importlib.util.spec_from_file_location('eval_cli', ROOT / 'eval.py')
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    root = digits_tree(tmp_path / 'data', count=30)
    (root / 'val').symlink_to(root / 'train')
    shard(root, tmp_path / 'shards')
    classes = len(list((root / 'train').iterdir()))
    torch.manual_seed(0)
    config = get_config('testing')
    config.transformer.orders = parse_orders('none')  # a plain ViT: cheap
    model = VisionTransformer(config, img_size=16, num_classes=classes)
    torch.save(model.state_dict(), tmp_path / 'model.pth')
    common = ['--ckpt', str(tmp_path / 'model.pth'), '--model_type', 'testing', '--img_size', '16', '--device', 'cpu',
              '--orders', 'none', '--dataset', 'imagenet', '--batch_size', '4']
    folder = eval_cli.main(common + ['--data_dir', str(root), '--num_workers', '0',
                                     '--output_json', str(tmp_path / 'folder.json')])
    shards = eval_cli.main(common + ['--shards', str(tmp_path / 'shards' / 'train-*.tar'), '--num_workers', '2',
                                     '--output_json', str(tmp_path / 'shards.json')])
    assert shards['images'] == folder['images'] == 30
    for key in ('top1', 'top5', 'loss'):
        assert shards[key] == pytest.approx(folder[key], rel=1e-6)
