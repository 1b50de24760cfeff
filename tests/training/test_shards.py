"""Tar shards (scripts/make_shards.py) read with webdataset: each image once over processes and workers, the
pixels of the folder reader, deterministic and resumable writing, one-line errors for damaged shards; training
on shards: equal steps per process, each image at most once an epoch, exact resume."""
import io
import multiprocessing
import os
import socket
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from utils.data_utils import Augmented, load_split
from utils.images import Skipped, UnreadableImage, eval_pixels, train_pixels
from utils.shards import ShardImages, TrainingShards
from train_helpers import killed_and_resumed, tiny_args, weights

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
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'train-000002.tar').write_text('my notes')  # a foreign file at the last shard's place
    with pytest.raises(FileExistsError, match=r'train-000002\.tar exists and is not shard 2 of this plan'):
        shard(root, tmp_path / 'd')
    assert sorted(f.name for f in (tmp_path / 'd').iterdir()) == ['train-000002.tar']  # found before writing any
    (tmp_path / 'e').mkdir()
    os.mkfifo(tmp_path / 'e' / 'train-000001.tar')  # opening it to read would block forever
    with pytest.raises(FileExistsError, match=r'train-000001\.tar exists and is not shard 1 of this plan'):
        shard(root, tmp_path / 'e')
    with pytest.raises(UnreadableImage, match=r'cannot read shard .*train-000001\.tar: not a regular file'):
        ShardImages(str(tmp_path / 'e' / 'train-000001.tar'), eval_pixels(8))


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


def test_tar_members_reads_what_tarfile_reads_and_refuses_damaged_headers(tmp_path):
    from utils.shards import READ_BUFFER, TAR_BLOCK, tar_members
    rng = np.random.default_rng(0)
    files = [('a' * 60 + '/' + 'b' * 70 + '.jpg', rng.bytes(1000)), ('x.cls', b'3'), ('empty.txt', b''),
             ('block.bin', rng.bytes(1024))]  # a name only ustar's prefix field holds; sizes 0 and whole blocks
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [(m['fname'], m['data']) for m in tar_members(io.BytesIO(whole), 'u')] == expected == files

    def members(data: bytes) -> list[str]:
        return [m['fname'] for m in tar_members(io.BytesIO(data), 'u')]
    second = 512 + 1024  # the second member's header
    for damaged, error in [(whole[:second + 100], 'unexpected end of data'),  # in a header
                           (whole[:second + 512 + 1], 'unexpected end of data'),  # in a member's data
                           (whole[:second] + b'y' + whole[second + 1:], 'bad checksum'),
                           (whole[:second + 148] + b'zzzzzzzz' + whole[second + 156:], 'invalid header')]:
        with pytest.raises(tarfile.ReadError, match=error):
            members(damaged)
    assert members(whole[:second]) == [files[0][0]]  # cut between members: the count against the metadata tells

    class Trickle(io.BytesIO):
        """A stream that gives at most 100 bytes a read, as a pipe may, and records what each read asked for."""
        asked: list[int] = []

        def read(self, size=-1):
            self.asked.append(size)
            return super().read(min(size, 100))
    assert [(m['fname'], m['data']) for m in tar_members(Trickle(whole), 'u')] == files  # short reads joined
    huge = bytearray(whole[:TAR_BLOCK])  # a damaged size field: 8 GiB, in a stream of 1,000 bytes
    huge[124:136], huge[148:156] = b'77777777777\0', b' ' * 8
    huge[148:156] = b'%06o\0 ' % sum(huge)
    Trickle.asked.clear()
    with pytest.raises(tarfile.ReadError, match='unexpected end of data'):
        list(tar_members(Trickle(bytes(huge) + whole[TAR_BLOCK:2 * TAR_BLOCK]), 'u'))
    assert max(Trickle.asked) <= READ_BUFFER  # no read asks for (so allocates) the 8 GiB
    folder = tarfile.TarInfo('folder')
    folder.type = tarfile.DIRTYPE
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(folder)
    with pytest.raises(tarfile.ReadError, match=r"member folder/ is of tar type b'5': expected a regular file"):
        members(buffer.getvalue())


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


def key(image: torch.Tensor, label: int) -> tuple:
    return tuple(image.flatten().tolist()) + (int(label),)


def folder_keys(root: Path) -> Counter:
    folder = Augmented(load_split('imagenet', str(root), train=True), eval_pixels(8), seed=0)
    return Counter(key(*folder[i]) for i in range(len(folder)))


def training_batches(pattern: str, world: int, workers: int, global_batch: int, micro: int, epoch: int = 0,
                     start: int = 0, skip: bool = False) -> list[list[list]]:
    """Per process, its micro-batches of one epoch (identified by pixels and label, or a Skipped)."""
    ranks = []
    for rank in range(world):
        data = TrainingShards(pattern, eval_pixels(8), 0, rank, world, skip, global_batch, micro)
        data.set_epoch(epoch, start)
        loader = DataLoader(data, batch_size=micro, num_workers=workers, collate_fn=lambda batch: batch)
        ranks.append([[item if isinstance(item, Skipped) else key(*item) for item in batch] for batch in loader])
    return ranks


def test_training_shards_give_every_process_equal_steps_each_image_at_most_once(tmp_path):
    root = digits_tree(tmp_path / 'data')  # 40 images in shards of 7: 7, 7, 7, 7, 7, 5
    shard(root, tmp_path / 'shards')
    pattern, images = str(tmp_path / 'shards' / 'train-*.tar'), folder_keys(root)
    for world, global_batch in ((1, 12), (2, 12), (3, 12), (2, 8)):
        used = 40 // global_batch * global_batch  # whole global batches: 36 of 40 images, or all 40
        micro = global_batch // world
        by_workers = {}
        for workers in (0, 2):
            ranks = training_batches(pattern, world, workers, global_batch, micro)
            assert [sum(map(len, batches)) for batches in ranks] == [used // world] * world  # equal steps
            assert all(len(batch) == micro for batches in ranks for batch in batches)
            seen = Counter(item for batches in ranks for batch in batches for item in batch)
            assert sum(seen.values()) == used and not seen - images  # each image at most once (once if all used)
            by_workers[workers] = [sorted(batches) for batches in ranks]
        assert by_workers[0] == by_workers[2], world  # the same micro-batches, in another order
    first, second = (training_batches(pattern, 1, 0, 12, 12, epoch) for epoch in (0, 1))
    assert first != second  # the shard order is shuffled by epoch: other batches, other images left out


def test_training_shards_resume_mid_epoch_with_the_remaining_micro_batches(tmp_path):
    shard(digits_tree(tmp_path / 'data'), tmp_path / 'shards')
    pattern = str(tmp_path / 'shards' / 'train-*.tar')
    for workers in (2, 3):
        [whole] = training_batches(pattern, 1, workers, 12, 4, epoch=1)  # 9 micro-batches of 4
        for done in (1, 2, 5):
            [rest] = training_batches(pattern, 1, workers, 12, 4, epoch=1, start=done * 4)
            assert rest == whole[done:], (workers, done)


def test_training_shards_skip_the_images_of_a_truncated_shard_in_place(tmp_path):
    paths = shard(digits_tree(tmp_path / 'data'), tmp_path / 'shards')
    pattern = str(tmp_path / 'shards' / 'train-*.tar')
    whole = training_batches(pattern, 2, 0, 8, 4)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:len(data) // 2])
    with pytest.raises(UnreadableImage, match=r'train-000002\.tar is damaged or truncated .* \(use --skip_corrupt'):
        training_batches(pattern, 2, 0, 8, 4)
    damaged = training_batches(pattern, 2, 0, 8, 4, skip=True)
    assert [[len(batch) for batch in batches] for batches in damaged] == [[4] * 5] * 2  # equal steps still
    lost = [item.index for batches in damaged for batch in batches for item in batch if isinstance(item, Skipped)]
    assert 0 < len(lost) < 7 and set(lost) <= set(range(14, 21))  # part of shard 2 (images 14 to 20) is lost
    kept = [(whole[r][b][i], item) for r, batches in enumerate(damaged) for b, batch in enumerate(batches)
            for i, item in enumerate(batch) if not isinstance(item, Skipped)]
    assert len(kept) == 40 - len(lost) and all(a == b for a, b in kept)  # the rest where it was

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def one_training_epoch(rank: int, world: int, port: int, argv: list[str], out: Path) -> None:
    """train.py's training loader for epoch 0, its uint8 batches saved: in a gloo process group of `world`
    spawned processes, or in this one for one process."""
    if world > 1:
        multiprocessing.set_start_method('fork', force=True)  # loader workers as train.py's get them
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank))
    import train
    from utils import dist_util
    device = dist_util.init_distributed('cpu')
    args = train.get_args(argv)
    preprocess = train.preprocess_of(args.model_type)
    train_set, val_set = train.build_datasets(args, preprocess)
    data, _ = train.build_loaders(args, train_set, val_set, train.micro_batch_size(args, world), device, preprocess)
    torch.save([(images, labels) for images, labels, _ in data.at(0, 0).loader], out / f'rank{rank}.pt')
    dist_util.cleanup()


def test_train_py_epoch_over_shards_sees_each_image_once_on_one_two_and_four_processes(tmp_path):
    root = digits_tree(tmp_path / 'data')
    shard(root, tmp_path / 'shards')
    images = folder_keys(root)
    pattern = str(tmp_path / 'shards' / 'train-*.tar')
    argv = tiny_args(tmp_path, 'epoch', '--dataset', 'imagenet', '--shards', pattern, '--val_shards', pattern,
                     '--img_size', '8', '--augment', 'none', '--num_workers', '1', batch=8)  # 40 = 5 steps of 8
    for world in (1, 2, 4):  # gloo processes
        out = tmp_path / f'world{world}'
        out.mkdir()
        if world == 1:
            one_training_epoch(0, 1, 0, argv, out)
        else:
            torch.multiprocessing.spawn(one_training_epoch, (world, free_port(), argv, out), nprocs=world)
        ranks = [torch.load(out / f'rank{rank}.pt') for rank in range(world)]
        assert [sum(len(labels) for _, labels in batches) for batches in ranks] == [40 // world] * world
        seen = Counter(key(image, label) for batches in ranks for images, labels in batches
                       for image, label in zip(images, labels))
        assert seen == images, world  # every image exactly once


def test_sigkill_then_resume_on_shards_is_bit_exact(tmp_path):
    shard(digits_tree(tmp_path / 'data'), tmp_path / 'shards')
    pattern = str(tmp_path / 'shards' / 'train-*.tar')
    common = ('--dataset', 'imagenet', '--shards', pattern, '--val_shards', pattern, '--num_workers', '2',
              '--eval_every', '3')
    steps = 8  # 5 an epoch: the resumed run crosses an epoch boundary
    resumed, killed_at, checkpoint, whole = killed_and_resumed(
        tmp_path, tiny_args(tmp_path, 'whole', *common, steps=steps, batch=8),
        tiny_args(tmp_path, 'killed', *common, steps=steps, batch=8), steps)
    final, expected = weights(checkpoint), weights(whole)
    assert torch.load(checkpoint, weights_only=True)['step'] == steps
    for name, value in expected.items():
        assert torch.equal(final[name], value), name
    import plot_routing  # the routing of a shards run is measured over its validation shards: all 40 images
    mean = plot_routing.main([str(whole.parent), '--out', str(tmp_path / 'routing.png'), '--batch_size', '16'])
    assert mean.shape == (2, 2) and np.allclose(mean.sum(-1), 1) and (tmp_path / 'routing.png').is_file()


def test_train_py_takes_shards_and_val_shards_together(capsys):
    import train
    for given in (['--shards', 'train-*.tar'], ['--val_shards', 'val-*.tar']):
        with pytest.raises(SystemExit):
            train.get_args(['--name', 'x', *given])
        assert '--shards and --val_shards: expected both' in capsys.readouterr().err
    assert train.get_args(['--name', 'x', '--shards', 'a.tar', '--val_shards', 'b.tar']).dataset == 'shards'
    assert train.get_args(['--name', 'x', '--shards', 'a.tar', '--val_shards', 'b.tar',
                           '--dataset', 'imagenet']).dataset == 'imagenet'  # the user's label for the shards
    assert train.get_args(['--name', 'x']).dataset == 'cifar10'
