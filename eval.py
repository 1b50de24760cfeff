"""Evaluate a checkpoint on a validation split, without training.

    python eval.py --ckpt output/cifar10-trar/best.ckpt --dataset cifar10
    python eval.py --ckpt vit_base_patch16_384.safetensors --dataset imagenet --data_dir /path/to/imagenet
    torchrun --nproc_per_node 8 eval.py --ckpt output/imagenet-trar/best.ckpt --dataset imagenet --data_dir ...

Any file model/pretrained.py reads works (train.py checkpoints, Google .npz, timm and ViT-pytorch state
dicts); its head must have the dataset's classes. Reports top-1 and top-5 accuracy, mean loss, the number
of images and, for a routed model, the mean routing weight of every layer and order. Under torchrun each
process evaluates a disjoint shard, so every image counts once. The summary is printed as one JSON line
(NaN as null) and then written to --output_json, which is checked before the evaluation: it never replaces
the checkpoint, an input, a file this project's tools did not write, or the summary of another checkpoint
(utils/outputs.py).
"""
import sys

if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting('interrupted (Ctrl-C): nothing was written')

import argparse  # noqa: E402 (the handler above comes first)
import json  # noqa: E402
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from model import timm_trar
from model.config import parse_orders
from utils import dist_util, inference, outputs
from utils.data_utils import DATASETS, DeviceBatches, collate_skipping_none, evaluation_set, load_split
from utils.images import UnreadableImage, eval_pixels, preprocess_of
from utils.shards import ShardImages
from utils.engine import Precision, evaluate
from utils.errors import command_line
from utils.files import describe
from utils.tool import check_arguments


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='weights to evaluate (any layout model/pretrained.py reads)')
    p.add_argument('--dataset', choices=DATASETS, default='cifar10')
    p.add_argument('--data_dir', default='./data', help='dataset root (imagenet: val/ below it)')
    p.add_argument('--output_json', default=None,
                   help='where to write the summary, a .json file (default: '
                        'output/eval/<checkpoint folder>_<checkpoint name>-<dataset>.json)')
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
    files.add_argument('--model_type', default=inference.DEFAULT_MODEL_TYPE,
                       help='config name in model/config.py, or timm:<timm model name> (--ckpt: a file or hub id)')
    files.add_argument('--orders', default=None, help="span orders, e.g. 0,1,2 (default: a plain ViT unless the "
                                                      "file has routers)")
    p.add_argument('--img_size', type=int, default=None,
                   help="default: the checkpoint's (train.py) or its position embeddings' size")
    args = p.parse_args(argv)
    check_arguments(p, args, positive=('batch_size', 'img_size'))
    if args.num_workers < 0:
        p.error(f"--num_workers {args.num_workers}: expected a non-negative integer")
    return args


def output_path(args: argparse.Namespace) -> Path:
    """--output_json, or a name of the checkpoint's folder, the checkpoint and the dataset under output/eval/."""
    if args.output_json:
        return Path(args.output_json)
    ckpt = Path(args.ckpt).resolve()
    return Path('output') / 'eval' / f"{ckpt.parent.name}_{ckpt.stem}-{args.dataset}.json"


def check_output(args: argparse.Namespace) -> Path:
    """Where the summary goes, refused before the evaluation (utils/outputs.py's rule) and when it holds the
    summary of another checkpoint."""
    out = outputs.check_output(output_path(args), '--output_json', ('.json',), inputs=[args.ckpt])
    if out.exists():
        try:
            previous = json.loads(out.read_text()).get('checkpoint')
        except (ValueError, OSError, AttributeError):
            previous = None
        if previous is None or Path(previous).resolve() != Path(args.ckpt).resolve():
            raise ValueError(f"--output_json {out} holds the summary of another checkpoint ({previous}); "
                             "it is never replaced: pass another --output_json")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    device = dist_util.init_distributed(args.device)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    out = check_output(args)  # every process: all fail together, before the evaluation
    orders = parse_orders(args.orders) if args.orders is not None else None
    weights = None
    if not timm_trar.is_timm(args.model_type):
        model, weights = inference.load_model(args.ckpt, args.model_type, orders, args.img_size,
                                              batch=args.batch_size, device=device, ema=args.use_ema)
    images = (ShardImages(args.shards, rank=rank, world_size=world, skip_corrupt=args.skip_corrupt) if args.shards
              else load_split(args.dataset, args.data_dir, False, args.skip_corrupt))
    if weights is None:  # a timm model's weights: a local file or hub id
        model = timm_trar.pretrained_model(args.model_type, args.ckpt, orders or [], args.img_size,
                                           len(images.classes))
        layout, trained_on = 'timm', None
    else:
        layout, trained_on = weights.layout, inference.class_names_of(weights)
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
    if rank == 0:  # the long work starts here
        print(f"eval.py: evaluating {args.ckpt} on {args.shards or args.dataset}; the summary goes to {out}",
              file=sys.stderr, flush=True)
    result = evaluate(model.to(device), loader, precision)
    summary = {
        'checkpoint': str(args.ckpt), 'ema': args.use_ema, 'layout': layout, 'dataset': args.dataset,
        'img_size': img_size,
        'images': result.images, 'top1': result.accuracy, 'top5': result.top5, 'loss': result.loss,
        'orders': list(model.config.transformer.orders), 'routing': result.routing, 'world_size': world,
    }
    summary = outputs.finite_or_none(summary)  # JSON has no NaN: a NaN loss is null
    if rank == 0:
        print(json.dumps(summary, allow_nan=False), flush=True)  # first: a failed write loses nothing
        if summary['loss'] is None:
            print("warning: the mean loss is not finite: the model's outputs overflow", file=sys.stderr)
        try:
            outputs.write_text(out, outputs.json_text(summary, 'eval.py'))
        except OSError as error:
            raise ValueError(f"cannot write --output_json {out}: {describe(error)} (the summary is printed above)") \
                from None
    dist_util.cleanup()
    return summary


if __name__ == '__main__':
    command_line(main, 'eval.py', expected=(ValueError, OSError, UnreadableImage),
                 interrupted='interrupted (Ctrl-C): nothing was written')
