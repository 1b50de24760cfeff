"""Evaluate a checkpoint on a validation split, without training.

    python eval.py --ckpt output/cifar10-trar/best.ckpt --dataset cifar10
    python eval.py --ckpt vit_base_patch16_384.safetensors --dataset imagenet --data_dir /path/to/imagenet
    torchrun --nproc_per_node 8 eval.py --ckpt output/imagenet-trar/best.ckpt --dataset imagenet --data_dir ...

Any file model/pretrained.py reads works (train.py checkpoints, Google .npz, timm and ViT-pytorch state
dicts); its head must have the dataset's classes. Reports top-1 and top-5 accuracy, mean loss, the number
of images and, for a routed model, the mean routing weight of every layer and order. Under torchrun each
process evaluates a disjoint shard, so every image counts once. The summary is printed as one JSON line
and written to --output_json.
"""
import argparse
import json
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from model import pretrained, timm_trar
from model.config import parse_orders
from utils import dist_util
from utils.data_utils import (DATASETS, DeviceBatches, ShardImages, UnreadableImage,
                              collate_skipping_none, eval_pixels, evaluation_set, load_split,
                              preprocess_of)
from utils.engine import Precision, evaluate
from utils.errors import command_line


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='weights to evaluate (any layout model/pretrained.py reads)')
    p.add_argument('--dataset', choices=DATASETS, default='cifar10')
    p.add_argument('--data_dir', default='./data', help='dataset root (imagenet: val/ below it)')
    p.add_argument('--output_json', default=None,
                   help='where to write the summary (default: output/eval/<checkpoint name>-<dataset>.json)')
    p.add_argument('--batch_size', type=int, default=64, help='per-process batch size')
    p.add_argument('--num_workers', type=int, default=4, help='data-loading processes per process')
    p.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    p.add_argument('--fp16', action='store_true', help='autocast in --amp_dtype')
    p.add_argument('--amp_dtype', choices=('fp16', 'bf16'), default='bf16')
    p.add_argument('--skip_corrupt', action='store_true', help='skip unreadable images with a warning')
    p.add_argument('--shards', default=None, help="read tar shards from scripts/make_shards.py instead of --data_dir: "
                                                  "'shards/val-{000000..000049}.tar', a glob or a URL pattern")
    p.add_argument('--use_ema', action='store_true',
                   help='evaluate the weight average of a train.py checkpoint written with --model_ema')
    files = p.add_argument_group('files without a config (.npz, timm and bare state dicts)')
    files.add_argument('--model_type', default='ViT-B_16',
                       help='config name in model/config.py, or timm:<timm model name> (--ckpt: a file or hub id)')
    files.add_argument('--orders', default=None, help="span orders, e.g. 0,1,2 (default: a plain ViT unless the "
                                                      "file has routers)")
    p.add_argument('--img_size', type=int, default=None,
                   help="default: the checkpoint's (train.py) or its position embeddings' size")
    args = p.parse_args(argv)
    for flag in ('batch_size', 'img_size'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} {value}: expected a positive integer")
    if args.num_workers < 0:
        p.error(f"--num_workers {args.num_workers}: expected a non-negative integer")
    return args


def output_path(args: argparse.Namespace) -> Path:
    return Path(args.output_json or Path('output') / 'eval' / f"{Path(args.ckpt).stem}-{args.dataset}.json")


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    device = dist_util.init_distributed(args.device)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    out = output_path(args)
    if out.is_dir():
        raise ValueError(f"--output_json {out} is a folder; expected a file name")
    orders = parse_orders(args.orders) if args.orders is not None else None
    weights = None if timm_trar.is_timm(args.model_type) else pretrained.read(args.ckpt, ema=args.use_ema)
    images = (ShardImages(args.shards, rank=rank, world_size=world, skip_corrupt=args.skip_corrupt) if args.shards
              else load_split(args.dataset, args.data_dir, False, args.skip_corrupt))
    if weights is None:  # a timm model's weights: a local file or hub id
        model = timm_trar.pretrained_model(args.model_type, args.ckpt, orders or [], args.img_size,
                                           len(images.classes))
        layout, trained_on = 'timm', None
    else:
        model = pretrained.build_model(weights, args.model_type, orders, args.img_size)
        layout, trained_on = weights.layout, weights.checkpoint.get('class_names')
    if len(images.classes) != model.num_classes or (trained_on and list(trained_on) != list(images.classes)):
        raise ValueError(f"{args.ckpt} classifies {model.num_classes} classes"
                         f"{' of another dataset' if trained_on and len(trained_on) == len(images.classes) else ''}"
                         f"; {args.dataset} has {len(images.classes)}")
    img_size = model.img_size[0]
    preprocess = preprocess_of(model)
    dataset, sampler = evaluation_set(images, eval_pixels(img_size, preprocess), rank, world)
    loader = DeviceBatches(DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                      num_workers=args.num_workers, pin_memory=device.type == 'cuda',
                                      collate_fn=partial(collate_skipping_none, image_shape=(3, img_size, img_size))),
                           device, preprocess)
    precision = Precision.from_args(args.fp16, 'O1', args.amp_dtype, 0, device)
    result = evaluate(model.to(device), loader, precision)
    summary = {
        'checkpoint': str(args.ckpt), 'ema': args.use_ema, 'layout': layout, 'dataset': args.dataset,
        'img_size': img_size,
        'images': result.images, 'top1': result.accuracy, 'top5': result.top5, 'loss': result.loss,
        'orders': list(model.config.transformer.orders), 'routing': result.routing, 'world_size': world,
    }
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + '\n')
        print(json.dumps(summary), flush=True)
    dist_util.cleanup()
    return summary


if __name__ == '__main__':
    command_line(main, expected=(ValueError, OSError, UnreadableImage))
