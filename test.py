"""Predict the class of an image, or of every image in a folder, with a TRAR-ViT.

    python test.py --ckpt output/demo/best.ckpt --image pic/1.jpg
    python test.py --ckpt output/demo/best.ckpt --image pic/ --json
    python test.py --ckpt output/demo/best.ckpt --image pic/1.jpg --routing_plot routing.png
    python test.py --ckpt ViT-B_16.npz --model_type ViT-B_16 --img_size 384 --image cat.jpg

A checkpoint written by train.py carries its model config, image size and class names. Other files
(Google `.npz`, timm and ViT-pytorch state dicts, read by model/pretrained.py) carry only weights: the
config comes from `--model_type` (a plain ViT unless `--orders` says otherwise or the file has router
weights), the image size and number of classes from the file unless given. Images are preprocessed
with training's evaluation transform.
"""
import sys

if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse  # noqa: E402 (the handler above comes first)
import json  # noqa: E402
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import matplotlib.pyplot as plt
from PIL import Image

from model import timm_trar
from model.config import parse_orders
from model.modeling import VisionTransformer
import utils.images
from utils import inference, outputs
from utils.data_utils import DATASETS, class_names
from utils.folders import imagenet_1k_names, is_image_file
from utils.images import UnreadableImage, get_eval_transform, preprocess_of
from utils.files import describe
from utils.tool import check_arguments
from utils.errors import command_line, one_line
from utils.visualize import cls_attention, routing_figure


class InputError(Exception):
    """A bad file or argument: reported as one line on stderr, with a non-zero exit."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ckpt', default='output/demo/best.ckpt',
                        help="checkpoint written by train.py, Google .npz, timm .safetensors/.pth/.bin "
                             "or a ViT-pytorch state dict")
    parser.add_argument('--image', default='./pic/1.jpg', help='an image file, or a folder of images')
    parser.add_argument('--topk', type=int, default=5, help='how many classes to list')
    parser.add_argument('--json', action='store_true', help='print one JSON object per image')
    parser.add_argument('--routing_plot', default=None, metavar='OUT.png',
                        help='save the CLS attention and routing weights picture here '
                             '(for a folder: OUT_<image name>.png per image)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--use_ema', action='store_true',
                        help='the weight average of a train.py checkpoint written with --model_ema')
    weights = parser.add_argument_group("checkpoints without a config (.npz, timm and bare state dicts)")
    weights.add_argument('--model_type', default=inference.DEFAULT_MODEL_TYPE,
                         help='config name in model/config.py, or timm:<timm model name> (--ckpt: a file or hub id)')
    weights.add_argument('--img_size', type=int, default=None, help='default: from the position embeddings')
    weights.add_argument('--num_classes', type=int, default=None, help='default: from the head')
    weights.add_argument('--orders', default=None, help="span orders, e.g. 0,1,2, or 'none' (default: "
                                                        "'none' for .npz, the config's for a routed state dict)")
    weights.add_argument('--dataset', default=None, choices=DATASETS,
                         help='take class names from this dataset (default: ImageNet-1k names for 1000 classes)')
    weights.add_argument('--data_dir', default='./data', help='where --dataset lives')
    args = parser.parse_args(argv)
    check_arguments(parser, args, positive=('topk', 'img_size', 'num_classes'))
    return args


# ---------------------------------------------------------------------------------------------
# Models


def load_model(args: argparse.Namespace) -> tuple[VisionTransformer, list[str]]:
    """The model in eval mode and its class names, from any file model/pretrained.py reads."""
    path = Path(args.ckpt)
    timm_model = timm_trar.is_timm(args.model_type)  # its weights: a local file or hub id
    if not path.exists() and not timm_model:
        raise InputError(f"checkpoint {str(path)!r} not found")
    try:
        orders = parse_orders(args.orders) if args.orders is not None else None
        if timm_model:
            model = timm_trar.pretrained_model(args.model_type, args.ckpt, orders or [], args.img_size,
                                               args.num_classes)
            return model, names_for(model.num_classes, args)
        model, weights = inference.load_model(path, args.model_type, orders, args.img_size, args.num_classes,
                                              device=args.device, ema=args.use_ema)
    except ValueError as error:
        raise InputError(one_line(error, limit=None)) from None
    own = inference.class_names_of(weights)
    if own is None:
        return model, names_for(model.num_classes, args)
    if args.dataset is not None and names_for(model.num_classes, args) != own:
        raise InputError(f"--dataset {args.dataset}: {path} is a train.py checkpoint, which carries its own class "
                         f"names ({', '.join(own[:3])}, ...); expected no --dataset")
    return model, own


def names_for(num_classes: int, args: argparse.Namespace) -> list[str]:
    """Class names for checkpoints that carry none: from --dataset, else the defaults."""
    if args.dataset is None:
        return default_class_names(num_classes)
    try:
        names = class_names(args.dataset, args.data_dir)
    except FileNotFoundError as error:  # CIFAR-100 not downloaded and offline
        raise InputError(str(error)) from None
    if len(names) != num_classes:
        raise InputError(f"--dataset {args.dataset} has {len(names)} classes, the checkpoint {num_classes}")
    return names


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k names for a 1000-class head, else the class indices."""
    if num_classes == 1000:
        return imagenet_1k_names()
    return [str(index) for index in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# Images and predictions


def image_paths(path: Path) -> list[Path]:
    """The image itself, or the image files of a folder (the files training reads, `is_image_file`), by name."""
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if is_image_file(p))
        if not paths:
            raise InputError(f"no image files in folder {str(path)!r}")
        return paths
    if not path.exists():
        raise InputError(f"image {str(path)!r} not found")
    return [path]


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image (training's reader), so that a bad file fails here, clearly."""
    try:
        return utils.images.read_image(path)
    except UnreadableImage as error:
        raise InputError(str(error)) from None


@torch.inference_mode()
def predict(model: VisionTransformer, x: torch.Tensor, names: list[str], topk: int) -> dict:
    """Top-k classes of one preprocessed image (1, 3, H, W), and the routing weights used."""
    probs = model(x).float().softmax(-1)[0]
    if not torch.isfinite(probs).all():
        raise InputError("the model's output is not finite (NaN or infinite): expected finite logits; "
                         "try without --device cuda's lower precision, or check the checkpoint")
    values, indices = probs.topk(min(topk, probs.numel()))
    result = {
        'index': int(indices[0]),
        'label': names[indices[0]],
        'topk': [[int(i), names[i], round(float(p), 6)] for p, i in zip(values, indices)],
    }
    routing = model.routing_weights()
    if routing is not None:
        result['orders'] = list(model.config.transformer.orders)
        result['routing'] = [[round(float(w), 6) for w in layer] for layer in routing[:, 0]]
    return result


def format_line(path: Path, result: dict) -> str:
    """One readable line: the prediction and the top-k with probabilities."""
    top = ', '.join(f"{i} ({label}) {p:.3f}" for i, label, p in result['topk'])
    return f"{path}: {result['index']} ({result['label']}) | top-{len(result['topk'])}: {top}"


def draw_routing(model: VisionTransformer, x: torch.Tensor, result: dict, out: Path, name: str) -> None:
    """Save the CLS attention of the last layer and the routing weights of this image."""
    maps = model.attention_maps(x)
    attention = cls_attention(maps[-1][0], model.grid)
    shown = x[0].permute(1, 2, 0).float().cpu().numpy()
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)  # the model's view, in [0, 1]
    routing = np.asarray(result['routing']) if 'routing' in result else None
    probability = result['topk'][0][2]
    title = f"{name}: predicted {result['label']} ({probability:.0%})"
    fig = routing_figure(shown, attention, routing, model.config.transformer.orders, title)
    try:  # all of the picture or none of it, even on a full disk
        outputs.save_figure(fig, out, 'test.py', dpi=120)
    except OSError as error:
        raise InputError(f"cannot write --routing_plot {out}: {describe(error)}") from None
    finally:
        plt.close(fig)


def plot_paths(out: str, images: list[Path], ckpt: str) -> dict[Path, Path]:
    """Where each image's routing picture goes, checked before the model is loaded (utils/outputs.py's rule).

    One image: `out`. Several: `out`'s stem + `_<image stem>` for each, or `_<image name>` for images whose
    stem another one shares (a.jpg, a.png). Refused: pictures that would share one file, and any that
    `outputs.check_figure` refuses (another format than .png/.pdf/.svg, an input image or the checkpoint,
    a file this project did not write, a place that cannot be written).
    """
    out = Path(out)
    stems = Counter(image.stem for image in images)
    plots = {image: out.with_name(f"{out.stem}_{image.stem if stems[image.stem] == 1 else image.name}{out.suffix}")
             for image in images} if len(images) > 1 else {images[0]: out}
    if len(set(plots.values())) < len(plots):
        raise InputError(f"--routing_plot {out}: two images would share one picture; expected distinct image names")
    try:
        for plot in plots.values():
            outputs.check_figure(plot, '--routing_plot', inputs=[*images, ckpt])
    except ValueError as error:
        raise InputError(str(error)) from None
    return plots


def run(args: argparse.Namespace) -> int:
    """Predict every image; returns the exit status (1 if any image failed)."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    paths = image_paths(Path(args.image))
    plots = plot_paths(args.routing_plot, paths, args.ckpt) if args.routing_plot else {}
    model, names = load_model(args)
    model.to(args.device)
    transform = get_eval_transform(model.img_size[0], preprocess_of(model))
    status = 0
    for path in paths:
        try:
            x = transform(read_image(path)).unsqueeze(0).to(args.device)
        except InputError as error:
            if len(paths) == 1:
                raise
            print(f"test.py: error: {error}", file=sys.stderr)
            status = 1
            continue
        result = predict(model, x, names, args.topk)
        print(json.dumps({'image': str(path), **result}) if args.json else format_line(path, result), flush=True)
        if plots:
            draw_routing(model, x, result, plots[path], path.name)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as error:
        print(f"test.py: error: {error}", file=sys.stderr)
        return 1


EXPECTED = (InputError, ValueError, OSError)  # one line each; ValueError: an environment knob checked when used

if __name__ == '__main__':
    command_line(main, 'test.py', expected=EXPECTED)
