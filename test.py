"""Predict the class of an image, or of every image in a folder, with a TRAR-ViT.

    python test.py --ckpt output/demo/best.ckpt --image pic/1.jpg
    python test.py --ckpt output/demo/best.ckpt --image pic/ --json
    python test.py --ckpt output/demo/best.ckpt --image pic/1.jpg --routing_plot routing.png
    python test.py --ckpt ViT-B_16.npz --model_type ViT-B_16 --img_size 384 --image cat.jpg

A checkpoint written by train.py carries its model config, image size and class names. Google's
official `.npz` files carry only weights: the config comes from `--model_type` (a plain ViT unless
`--orders` says otherwise, since the file has no router weights), the image size and number of
classes from the file unless given. Images are preprocessed with training's evaluation transform.
"""
import argparse
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np
import torch
from PIL import Image

from model.config import get_config, parse_orders
from model.modeling import VisionTransformer
from utils import checkpoint as checkpoints
from utils.data_utils import DATASETS, class_names, get_eval_transform, imagenet_1k_names
from utils.errors import one_line
from utils.visualize import cls_attention, save_routing_plot


class InputError(Exception):
    """A bad file or argument: reported as one line on stderr, with a non-zero exit."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ckpt', default='output/demo/best.ckpt',
                        help="checkpoint written by train.py (.ckpt/.bin) or Google's official .npz")
    parser.add_argument('--image', default='./pic/1.jpg', help='an image file, or a folder of images')
    parser.add_argument('--topk', type=int, default=5, help='how many classes to list')
    parser.add_argument('--json', action='store_true', help='print one JSON object per image')
    parser.add_argument('--routing_plot', default=None, metavar='OUT.png',
                        help='save the CLS attention and routing weights picture here '
                             '(for a folder: OUT_<image name>.png per image)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    weights = parser.add_argument_group("checkpoints without a config (official .npz, bare state dicts)")
    weights.add_argument('--model_type', default='ViT-B_16', help='config name in model/config.py')
    weights.add_argument('--img_size', type=int, default=None, help='default: from the position embeddings')
    weights.add_argument('--num_classes', type=int, default=None, help='default: from the head')
    weights.add_argument('--orders', default=None, help="span orders, e.g. 0,1,2, or 'none' (default: "
                                                        "'none' for .npz, the config's for a routed state dict)")
    weights.add_argument('--dataset', default=None, choices=DATASETS,
                         help='take class names from this dataset (default: ImageNet-1k names for 1000 classes)')
    weights.add_argument('--data_dir', default='./data', help='where --dataset lives')
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be at least 1, got {args.topk}")
    return args


# ---------------------------------------------------------------------------------------------
# Models


def load_model(args: argparse.Namespace) -> tuple[VisionTransformer, list[str]]:
    """The model in eval mode and its class names, from a train.py checkpoint or an official .npz."""
    path = Path(args.ckpt)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} not found")
    if path.suffix == '.npz':
        return load_official(path, args)
    try:
        checkpoint = checkpoints.read(path)
    except ValueError as error:
        raise InputError(str(error)) from None
    if 'state_dict' in checkpoint:
        return load_trained(path, checkpoint)
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return load_state_dict_only(path, checkpoint, args)
    raise InputError(f"{path} is not a TRAR-ViT checkpoint: no 'state_dict' in keys {sorted(checkpoint)[:8]}")


def load_trained(path: Path, checkpoint: dict) -> tuple[VisionTransformer, list[str]]:
    """A checkpoint written by train.py: everything needed is inside it."""
    missing = [key for key in ('config', 'img_size', 'num_classes') if key not in checkpoint]
    if missing:
        raise InputError(f"{path} is not a TRAR-ViT checkpoint: it lacks {', '.join(missing)}")
    config = ml_collections.ConfigDict(checkpoint['config'])
    model = build_model(path, config, checkpoint['img_size'], checkpoint['num_classes'])
    load_weights(model, checkpoint['state_dict'], path)
    names = checkpoint.get('class_names') or default_class_names(checkpoint['num_classes'])
    return model, list(names)


def load_state_dict_only(path: Path, state_dict: dict, args: argparse.Namespace):
    """A bare state dict (e.g. saved by ViT-pytorch): the config comes from the flags."""
    routed = any('.attn.router.' in key for key in state_dict)
    config = config_from_flags(args, default_orders=None if routed else [])
    posemb = state_dict.get('transformer.embeddings.position_embeddings')
    head = state_dict.get('head.weight')
    if posemb is None or head is None:
        raise InputError(f"{path} is not a ViT state dict: no position embeddings or head")
    img_size = args.img_size or image_size_from_posemb(posemb.shape[1], config, path)
    num_classes = args.num_classes or head.shape[0]
    model = build_model(path, config, img_size, num_classes)
    load_weights(model, state_dict, path)
    return model, names_for(num_classes, args)


def load_official(path: Path, args: argparse.Namespace) -> tuple[VisionTransformer, list[str]]:
    """Google's official ViT .npz (e.g. imagenet21k+imagenet2012/ViT-B_16.npz)."""
    try:
        weights = dict(np.load(path))
        posemb = weights['Transformer/posembed_input/pos_embedding']
        file_classes = weights['head/kernel'].shape[-1]
    except KeyError as error:
        raise InputError(f"{path} is not an official ViT checkpoint: no {error.args[0]!r}") from None
    except Exception as error:  # numpy raises several types for a file that is not an .npz
        raise InputError(f"{path} is not a readable .npz file: {one_line(error)}") from None
    config = config_from_flags(args, default_orders=[])
    img_size = args.img_size or image_size_from_posemb(posemb.shape[1], config, path)
    num_classes = args.num_classes or file_classes
    if num_classes != file_classes:
        raise InputError(f"--num_classes {num_classes} does not match the {file_classes} classes of {path}")
    model = build_model(path, config, img_size, num_classes)
    try:
        model.load_from(weights)
    except ValueError as error:
        raise InputError(f"{path} does not fit --model_type {args.model_type}: {one_line(error)}") from None
    return model.eval(), names_for(num_classes, args)


def config_from_flags(args: argparse.Namespace, default_orders: list[int] | None) -> ml_collections.ConfigDict:
    """`--model_type`'s config with `--orders` (or `default_orders`, None keeping the config's)."""
    try:
        config = get_config(args.model_type)
    except ValueError as error:
        raise InputError(str(error)) from None
    if args.orders is not None:
        try:
            config.transformer.orders = parse_orders(args.orders)
        except ValueError as error:
            raise InputError(str(error)) from None
    elif default_orders is not None:
        config.transformer.orders = default_orders
    return config


def image_size_from_posemb(num_tokens: int, config: ml_collections.ConfigDict, path: Path) -> int:
    """The square image size that a (1 + side^2)-token position embedding was trained at."""
    side = int(round((num_tokens - 1) ** 0.5))
    if side * side != num_tokens - 1:
        raise InputError(f"{path}: position embedding of {num_tokens} tokens is not a square grid; pass --img_size")
    return side * int(config.patches.size[0])


def build_model(path: Path, config: ml_collections.ConfigDict, img_size: int, num_classes: int) -> VisionTransformer:
    try:
        return VisionTransformer(config, img_size=img_size, num_classes=num_classes)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise InputError(f"{path}: cannot build its model: {one_line(error)}") from None


def load_weights(model: VisionTransformer, state_dict: dict, path: Path) -> None:
    """Load strictly, describing any mismatch in one line instead of torch's multi-line dump."""
    if not isinstance(state_dict, dict):
        raise InputError(f"{path}: 'state_dict' is a {type(state_dict).__name__}, not a dict")
    own = model.state_dict()
    problems = [f"missing {key}" for key in own if key not in state_dict]
    problems += [f"unexpected {key}" for key in state_dict if key not in own]
    problems += [f"{key} has shape {tuple(value.shape)}, model {tuple(own[key].shape)}"
                 for key, value in state_dict.items() if key in own and value.shape != own[key].shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ''
        raise InputError(f"{path}: weights do not fit its model config: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(state_dict)
    model.eval()


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
    """The image itself, or the image files in a folder (by extension, sorted by name)."""
    if path.is_dir():
        extensions = set(Image.registered_extensions())
        paths = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith('.') and p.suffix.lower() in extensions)
        if not paths:
            raise InputError(f"no image files in folder {str(path)!r}")
        return paths
    if not path.is_file():
        raise InputError(f"image {str(path)!r} not found")
    return [path]


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image, so that a truncated file fails here, clearly."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.UnidentifiedImageError:
        raise InputError(f"{path} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{path} is a damaged or truncated image: {one_line(error)}") from None


@torch.inference_mode()
def predict(model: VisionTransformer, x: torch.Tensor, names: list[str], topk: int) -> dict:
    """Top-k classes of one preprocessed image (1, 3, H, W), and the routing weights used."""
    probs = model(x).float().softmax(-1)[0]
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
    save_routing_plot(str(out), shown, attention, routing, model.config.transformer.orders, title)


def plot_path(out: str, image: Path, many: bool) -> Path:
    """`out` for a single image; `out`'s stem + `_<image stem>` for each image of a folder."""
    out = Path(out)
    return out.with_name(f"{out.stem}_{image.stem}{out.suffix}") if many else out


def run(args: argparse.Namespace) -> int:
    """Predict every image; returns the exit status (1 if any image failed)."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    paths = image_paths(Path(args.image))
    model, names = load_model(args)
    model.to(args.device)
    transform = get_eval_transform(model.img_size[0])
    if args.routing_plot:
        Path(args.routing_plot).parent.mkdir(parents=True, exist_ok=True)
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
        if args.routing_plot:
            draw_routing(model, x, result, plot_path(args.routing_plot, path, len(paths) > 1), path.name)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as error:
        print(f"test.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
