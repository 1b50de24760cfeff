"""What a run's routers learned, over a dataset: one picture of the mean routing weight per layer and order.

    python scripts/plot_routing.py output/demo_trar_seed1 --out docs/routing_layers.png

Left: a layers x orders heatmap of the mean routing weight over the validation set, from the run's
checkpoint (`last.ckpt`, the trained model, unless `--ckpt` names another). Right: per layer, how the
weights moved during training, from the `routing/layerLL_orderO` scalars train.py writes to TensorBoard
(the mean over the training batch of every 10th step). It is the dataset-level counterpart of the
per-image picture `test.py --routing_plot` draws. The mean weights are also printed and, with
`--json PATH`, written to a file. Every argument and output place is checked before the model is evaluated
(utils/outputs.py's rule); an error is one line naming this script.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model.modeling import VisionTransformer  # noqa: E402
from plot_curves import read_scalars  # noqa: E402
from utils import inference, outputs, tool  # noqa: E402
from utils.data_utils import Augmented, collate_skipping_none, evaluation_set, load_split  # noqa: E402
from utils.errors import command_line, message  # noqa: E402
from utils.images import get_eval_transform  # noqa: E402
from utils.shards import ShardImages  # noqa: E402
from utils.engine import Precision, evaluate  # noqa: E402
from utils.visualize import draw_routing, order_label  # noqa: E402

TOOL = 'plot_routing.py'
ROUTING_TAG = re.compile(r'routing/layer(\d+)_order(\d+)$')


def load_trained(path: Path, batch_size: int = 1) -> tuple[VisionTransformer, dict]:
    """The routed model a train.py checkpoint holds, in eval mode, and the checkpoint's other entries
    (utils/inference.py's checks: a truncated, hand-edited or non-finite file is one line)."""
    model, weights = inference.load_model(path, batch=batch_size)
    if weights.layout != 'train.py' or not isinstance(weights.checkpoint.get('args'), dict):
        raise ValueError(f"{path} is not a checkpoint written by train.py (it records the run's dataset): "
                         "expected a run's last.ckpt or best.ckpt")
    if not model.is_routed:
        raise ValueError(f"{path} holds a plain ViT (no orders): it has no routing to show")
    return model, weights.checkpoint


def mean_routing_weights(model: VisionTransformer, loader: DataLoader) -> tuple[np.ndarray, float]:
    """(layers, orders) routing weights averaged over every image `loader` yields, and the top-1 accuracy."""
    result = evaluate(model, loader, Precision('cpu'))
    return np.array(result.routing), result.accuracy


def validation_loader(args: dict, img_size: int, batch_size: int, data_dir: str | None = None) -> DataLoader:
    """The run's validation set with training's evaluation transform (from `data_dir` if the data moved)."""
    if args.get('val_shards'):  # a run trained on shards: its validation shards
        images = ShardImages(args['val_shards'], skip_corrupt=args.get('skip_corrupt', False))
        dataset, _ = evaluation_set(images, get_eval_transform(img_size), rank=0, world_size=1)
    else:
        data_dir = data_dir or args.get('data_dir', './data')
        try:
            images = load_split(args['dataset'], data_dir, False, args.get('skip_corrupt', False))
        except (FileNotFoundError, RuntimeError, OSError) as error:  # torchvision: RuntimeError for missing data
            raise ValueError(f"the run's {args['dataset']} data is not at {data_dir}: {message(error)}; "
                             "pass --data_dir where it is now") from None
        dataset = Augmented(images, get_eval_transform(img_size), args.get('seed', 0))
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping_none, num_workers=0)


def routing_history(run_dir: Path) -> dict[int, dict[int, tuple[list[int], list[float]]]]:
    """layer -> order -> (steps, mean weight over that step's training batch), from TensorBoard."""
    history: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
    for tag, curve in read_scalars(run_dir).items():
        match = ROUTING_TAG.match(tag)
        if match:
            history.setdefault(int(match[1]), {})[int(match[2])] = curve
    if not history:
        raise ValueError(f"{run_dir} has no routing/layerLL_orderO scalars: not a routed run")
    return dict(sorted(history.items()))


def check_history_matches(history: dict, layers: int, orders: list[int], run_dir: Path, ckpt: Path) -> None:
    """The logged routing is of the checkpoint's model: the same layers and orders."""
    logged = (len(history), sorted({order for layer in history.values() for order in layer}))
    if sorted(history) != list(range(layers)) or logged[1] != sorted(orders) \
            or any(sorted(layer) != sorted(orders) for layer in history.values()):
        raise ValueError(f"{ckpt} ({layers} layers, orders {orders}) is not the model whose routing {run_dir} "
                         f"logged ({logged[0]} layers, orders {logged[1]}): expected a checkpoint of that run")


def routing_layers_figure(weights: np.ndarray, orders: list[int],
                          history: dict[int, dict[int, tuple[list[int], list[float]]]], title: str = '') -> plt.Figure:
    """Left the (layers, orders) heatmap of `weights`, right one panel per layer of its weights over training."""
    layers = weights.shape[0]
    fig = plt.figure(figsize=(12, max(4.2, 1.5 * layers + 1)))
    grid = fig.add_gridspec(layers, 2, width_ratios=[1, 1.6], wspace=0.3)
    heatmap = fig.add_subplot(grid[:, 0])
    draw_routing(fig, heatmap, weights, orders)
    heatmap.set_title('mean routing weight over the validation set', fontsize=10)
    colors = plt.get_cmap('viridis')(np.linspace(0, 0.85, len(orders)))
    first = None
    for layer in range(layers):
        ax = fig.add_subplot(grid[layer, 1], sharex=first, sharey=first)
        first = first or ax
        for order, color in zip(orders, colors):
            steps, values = history[layer][order]
            ax.plot(steps, values, color=color, linewidth=1.2, label=f'order {order} ({order_label(order)})')
        ax.set_ylim(0, 1)
        ax.set_ylabel(f'layer {layer}', fontsize=9)
        ax.grid(alpha=0.3)
        if layer == 0:
            ax.set_title('routing weights during training (mean over the training batch)', fontsize=10)
            ax.legend(loc='upper left', fontsize=8, ncol=len(orders))
        if layer < layers - 1:
            ax.tick_params(labelbottom=False)
    ax.set_xlabel('training step')
    if title:
        fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.86 if title else 0.92, bottom=0.1)
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__.split('\n\n')[0])
    parser.add_argument('run', type=Path, help="a routed run's output folder (checkpoint and TensorBoard logs)")
    parser.add_argument('--ckpt', type=Path, default=None, help='the model to evaluate (default: RUN/last.ckpt)')
    parser.add_argument('--out', type=Path, default=Path('docs/routing_layers.png'))
    parser.add_argument('--json', type=Path, default=None, help='also write the mean weights here')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--data_dir', default=None, help="the run's dataset root (default: where it was trained)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: expected a positive integer")
    if not args.run.is_dir():
        parser.error(f"run folder {args.run} does not exist or is not a folder: expected a train.py run folder")
    return args


def main(argv: list[str] | None = None) -> np.ndarray:
    args = parse_args(argv)
    ckpt = args.ckpt or args.run / 'last.ckpt'
    outputs.check_figure(args.out, '--out', inputs=[ckpt])  # before the model is evaluated: a bad place fails first
    if args.json is not None:
        outputs.check_output(args.json, '--json', ('.json',), inputs=[ckpt])
    model, checkpoint = load_trained(ckpt, args.batch_size)
    orders = list(model.config.transformer.orders)
    history = routing_history(args.run)
    check_history_matches(history, model.config.transformer.num_layers, orders, args.run, ckpt)
    run_args = checkpoint['args']
    loader = validation_loader(run_args, model.img_size[0], args.batch_size, args.data_dir)
    weights, accuracy = mean_routing_weights(model, loader)
    print(f"{ckpt}: step {checkpoint.get('step')}, validation accuracy {accuracy:.2%}; mean routing weights:")
    for layer, row in enumerate(weights):
        print(f"layer {layer}: " + ', '.join(f"order {o} ({order_label(o)}) {w:.3f}" for o, w in zip(orders, row)))
    title = (f"What the routers of {args.run.name} learned ({run_args.get('dataset', '?')}, "
             f"seed {run_args.get('seed', '?')})")
    fig = routing_layers_figure(weights, orders, history, title)
    try:
        outputs.save_figure(fig, args.out, TOOL, dpi=120)
    finally:
        plt.close(fig)
    print(f"wrote {args.out}")
    if args.json is not None:
        outputs.write_text(args.json, outputs.json_text({'checkpoint': str(ckpt), 'step': checkpoint.get('step'),
                                                         'accuracy': accuracy, 'orders': orders,
                                                         'mean_routing_weights': weights.tolist()}, TOOL))
    return weights


if __name__ == '__main__':
    command_line(main, TOOL, expected=tool.EXPECTED)
