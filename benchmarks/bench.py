"""Side-by-side training-step benchmark: plain ViT-B/16, TRAR ViT-B/16 and the original stacked formulation.

    python benchmarks/bench.py --img_size 384 --batch 2 --orders 0,1,2             # CPU, two threads
    python benchmarks/bench.py --img_size 224 --batch 4 --orders 0,1,2,3
    python benchmarks/bench.py --preset demo --repeats 30 --no_memory             # scripts/demo.sh's small model
    python benchmarks/bench.py --device cuda --dtype bf16 --img_size 384 --batch 64 --compile
    python benchmarks/bench.py --recipes --img_size 224 --batch 4 --no_memory    # train.py's step: deit vs vit

Every variant runs in this one process, interleaved round by round (ABCABC...), and the table shows
medians over the rounds, so machine noise hits all variants alike. Peak memory: on CUDA
`max_memory_allocated` over a step; on a CPU, which keeps no allocator statistics, each variant runs
a step in a fresh child process and reports its peak resident memory above the memory it had before
building the model. `timm` (benchmarks/requirements.txt) adds timm's ViT-B/16 when installed, plain and routed
(`timm trar`: model/timm_trar.py's routed attention layer in timm's model, beside `trar`, this repository's).

`--recipes` times instead train.py's whole optimizer step of the TRAR model under the `vit` recipe and under
`deit` with every part on (RECIPE_STEPS), and the loader's per-image training transform of each.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse
import math
import multiprocessing
import statistics
import time
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from model import modeling  # noqa: E402
from utils.errors import command_line  # noqa: E402
from model.config import get_config, parse_orders  # noqa: E402
from model.modeling import VisionTransformer  # noqa: E402
from model.attention import Spans, check_orders  # noqa: E402
from model.attention.dense import dense_routed_attention  # noqa: E402
from model.attention.shared_scores import chunks  # noqa: E402



def stacked_attention(q, k, v, masks, alphas, dropout_p=0.0, **spans):
    """The original TRAR code's attention, step for step: per order a masked softmax map (dropout on each),
    concatenated one by one into (B, L, H, N, N), mixed by the routing weights with einsum, applied to V."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    for i, mask in enumerate(masks):
        att_map = F.dropout(F.softmax(scores.masked_fill(~mask, -1e9), dim=-1), dropout_p, torch.is_grad_enabled())
        att_list = att_map.unsqueeze(1) if i == 0 else torch.cat((att_list, att_map.unsqueeze(1)), 1)
    att_map = torch.einsum('bl,blcnm->bcnm', alphas.to(att_list.dtype), att_list)
    return torch.matmul(att_map, v)


class StackedViT(VisionTransformer):
    """The TRAR model with its attention swapped for the stacked formulation."""

    def forward(self, x):
        original = modeling.routed_attention
        modeling.routed_attention = lambda q, k, v, alphas, spans, dropout_p=0.0, **_: stacked_attention(
            q, k, v, spans.masks, alphas, dropout_p)
        try:
            return super().forward(x)
        finally:
            modeling.routed_attention = original


# `--preset demo`: the model scripts/demo.sh trains (model/config.py's `demo`: a 4-layer, 64-wide ViT) on
# 32-px images with 4-px patches (65 tokens), 10 classes, batch 32.
PRESETS = {'demo': dict(model_type='demo', img_size=32, batch=32, orders='0,1,2', num_classes=10)}


def model_config(args):
    """The benchmarked model's config: ViT-B/16 unless a preset (or gpu_check --dry's 'testing') names another."""
    config = get_config(getattr(args, 'model_type', 'ViT-B_16'))
    for key, value in getattr(args, 'config', {}).items():
        *scopes, field = key.split('.')
        scope = config
        for name in scopes:
            scope = scope[name]
        scope[field] = value
    config.transformer.dropout_rate = 0.0
    return config


def build(variant: str, args, drop_path: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant.startswith('timm'):
        import timm
        from model.timm_trar import trar_vit
        name = f'vit_base_patch16_{args.img_size}' if args.img_size in (224, 384) else 'vit_base_patch16_224'
        model = timm.create_model(name, img_size=args.img_size, num_classes=1000)
        return trar_vit(model, parse_orders(args.orders)) if variant == 'timm trar' else model  # model/timm_trar.py
    config = model_config(args)
    config.transformer.orders = [] if variant == 'plain' else parse_orders(args.orders)
    cls = StackedViT if variant == 'stacked' else VisionTransformer
    return cls(config, img_size=args.img_size, num_classes=getattr(args, 'num_classes', 1000), drop_path_rate=drop_path)


def variants(args) -> list[str]:
    names = ['plain', 'trar', 'stacked']
    if getattr(args, 'preset', None):
        return names  # timm's row is ViT-B/16's
    try:
        import timm  # noqa: F401
        names += ['timm', 'timm trar']
    except ImportError:
        print('timm is not installed: skipping its ViT-B/16 (pip install -r benchmarks/requirements.txt)')
    return names


def make_step(model: torch.nn.Module, args, device: torch.device):
    """One forward+backward training step on a fixed random batch."""
    model.to(device).train()
    if args.compile:
        model = torch.compile(model)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, getattr(args, 'num_classes', 1000), (args.batch,), device=device)
    dtype = torch.bfloat16 if args.dtype == 'bf16' else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


# `--recipes`: train.py's arguments of each timed recipe. `deit` with every part on: mixup/cutmix on the batch,
# drop path, the soft-target loss, AdamW, the EMA update, and layer decay (MAE's 0.65; deit's own has none).
RECIPE_STEPS = {'vit': ['--recipe', 'vit'], 'deit, layer decay 0.65': ['--recipe', 'deit', '--layer_decay', '0.65']}
# the loader's per-image input: an ImageNet-sized photo (the crop is what costs, not the file's decoding)
LOADER_IMAGE = (375, 500)


def recipe_args(recipe: list[str], args) -> argparse.Namespace:
    """train.py's checked arguments for a recipe at the benchmark's model, image size and batch."""
    import train
    precision = ((['--fp16', '--amp_dtype', 'bf16'] if args.dtype == 'bf16' else [])
                 + (['--compile'] if args.compile else []))
    return train.get_args(['--name', 'bench', '--img_size', str(args.img_size), '--train_batch_size',
                           str(args.batch), '--orders', args.orders, '--device', args.device, *precision, *recipe])


def recipe_steps(args, device: torch.device) -> dict[str, Callable[[], None]]:
    """Per RECIPE_STEPS entry, one optimizer step of train.py's own loop (utils/engine.optimizer_steps, built by
    train.build_optimization) on a fixed random batch: mixing, forward, loss, backward, clipping, optimizer,
    scheduler and EMA update, whichever the recipe turns on. The loader's augmentation is not in it."""
    import itertools
    import train
    from utils.engine import RunState, optimizer_steps
    steps = {}
    for name, recipe in RECIPE_STEPS.items():
        run = recipe_args(recipe, args)
        model = build('trar', args, drop_path=run.drop_path)
        _, optimization = train.build_optimization(run, model, device, world=1, micro_batch=args.batch)
        images = torch.randn(args.batch, 3, args.img_size, args.img_size)
        labels = torch.randint(0, getattr(args, 'num_classes', 1000), (args.batch,))
        batches = ((images.clone(), labels, []) for _ in itertools.count())  # mixing works in place
        steps[name] = partial(next, optimizer_steps(model, batches, optimization, RunState()))
    return steps


def loader_transforms(args) -> dict[str, Callable[[], None]]:
    """Per RECIPE_STEPS entry, train.py's training transform of one image (what each loader worker runs)."""
    import numpy as np
    from PIL import Image
    from utils.augment import train_transform
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*LOADER_IMAGE, 3), dtype=np.uint8))
    transforms = {}
    for name, recipe in RECIPE_STEPS.items():
        run = recipe_args(recipe, args)
        transforms[name] = partial(train_transform(args.img_size, run.augment, run.aa, run.reprob), image)
    return transforms


def print_recipes(args, device: torch.device) -> None:
    """The `--recipes` tables: the optimizer step per recipe, then the loader's transform per image."""
    times = time_rounds(recipe_steps(args, device), args, device)
    vit = times['vit']
    print(f"\n| recipe, TRAR model, one optimizer step (loader augmentation excluded) | step time (s) | vs vit | "
          "images/s |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {seconds / vit:.2f}x | {args.batch / seconds:.1f} |")
    transforms = time_rounds(loader_transforms(args), args, torch.device('cpu'))
    print(f"\n| recipe, training transform of one {LOADER_IMAGE[1]}x{LOADER_IMAGE[0]} image (a loader worker) | "
          "ms / image | vs vit |")
    print("|---|---|---|")
    for name, seconds in transforms.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / transforms['vit']:.2f}x |")


def eval_steps(args, device: torch.device) -> dict:
    """Inference forwards: plain, TRAR with soft routing (every order), TRAR with hard routing and binarize
    (one-hot weights: each image computes only the span it chose)."""
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    dtype = torch.bfloat16 if args.dtype == 'bf16' else None
    steps = {}
    for name, routing in (('plain', None), ('trar soft', 'soft'), ('trar binarized', 'hard')):
        model = build('plain' if routing is None else 'trar', args)
        for block in model.transformer.encoder.layer:
            if routing is not None:
                block.attn.router.routing, block.attn.router.binarize = routing, routing == 'hard'
        model.to(device).eval()
        if args.compile:
            model = torch.compile(model)

        def step(model=model):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(images)
        steps[name] = step
    return steps


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_rounds(steps: dict, args, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step function, interleaved over rounds after warm-up."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def plain_attention(q, k, v, masks, alphas):
    """Global attention with no routing (fused SDPA): what routing adds its cost to."""
    return F.scaled_dot_product_attention(q, k, v)


# The attention implementations compared alone, fwd+bwd: this repository's, the original code's, the fused
# per-order path that attention dropout uses, and plain attention.
ATTENTION = {'routed_attention': modeling.routed_attention, 'stacked (original)': stacked_attention,
             'fused SDPA per order': dense_routed_attention, 'plain attention': plain_attention}


class AttentionInputs(NamedTuple):
    """q, k, v, masks and routing weights at a model's attention shapes, and routed attention as the model calls it."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    masks: torch.Tensor
    alphas: torch.Tensor
    routed: Callable[..., torch.Tensor]  # routed(q, k, v, masks, alphas), with `spans` bound
    spans: Spans

    def routed_output(self) -> torch.Tensor:
        """Routed attention's output, outside autograd (detached inputs: CPU flex attention refuses any others)."""
        with torch.no_grad():
            return self.routed(*(t.detach() for t in (self.q, self.k, self.v, self.masks, self.alphas)))


def attention_inputs(args, device: torch.device) -> AttentionInputs:
    """Random q, k, v (B, H, N, d) requiring gradients, the span masks and routing weights (routers learn) of the
    benchmarked model at args' image size, batch and orders."""
    config = model_config(args)
    grid = args.img_size // config.patches.size[0]
    n, heads = grid * grid + 1, config.transformer.num_heads
    dim = config.hidden_size // heads
    spans = Spans(grid, parse_orders(args.orders)).to(device)  # as the model: built once, moved with it
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    q, k, v = (torch.randn(args.batch, heads, n, dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    alphas = torch.randn(args.batch, len(spans.orders), device=device).softmax(-1).requires_grad_()

    def routed(q, k, v, masks, alphas):  # what the model passes: every implementation can run
        return modeling.routed_attention(q, k, v, alphas, spans)
    return AttentionInputs(q, k, v, spans.masks, alphas, routed, spans)


def attention_steps(args, device: torch.device, layers: int, inputs: AttentionInputs | None = None) -> dict:
    """The ATTENTION implementations alone at the model's shapes: `layers` forwards, then one backward through
    all of them, as a training step runs its blocks (each layer keeps what its backward needs)."""
    q, k, v, masks, alphas, routed, _ = inputs or attention_inputs(args, device)

    def step_of(function):
        def step():
            sum(function(q, k, v, masks, alphas) for _ in range(layers)).sum().backward()
            q.grad = k.grad = v.grad = alphas.grad = None
        return step

    def products_only():
        """The seven (N, N) x (N, d) products of exact attention fwd+bwd with recomputed scores, nothing else,
        in routed_attention's chunks of heads (which run them faster than one big batch on a CPU)."""
        with torch.no_grad():
            for samples, heads in chunks(q.shape, q.device):
                cq, ck, cv = q[samples, heads], k[samples, heads], v[samples, heads]
                scores = cq @ ck.transpose(-2, -1)  # forward: scores, then the map times V
                grad_out = scores @ cv
                scores = cq @ ck.transpose(-2, -1)  # backward: recomputed scores, d map, dV, dQ, dK
                grad_map = grad_out @ cv.transpose(-2, -1)
                scores.transpose(-2, -1) @ grad_out, grad_map @ ck, grad_map.transpose(-2, -1) @ cq

    # The model's call: every implementation can run.
    steps = {name: step_of(function) for name, function in (ATTENTION | {'routed_attention': routed}).items()}
    return steps | {'products_only': products_only} if layers == 1 else steps


def cuda_peak_memory_mib(step, device: torch.device) -> tuple[float, float]:
    """Peak memory allocated to tensors and reserved by the caching allocator during one call of `step`
    (after one call that leaves its persistent state, e.g. gradients, in place)."""
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20, torch.cuda.max_memory_reserved(device) / 2 ** 20


def peak_memory_mib(kind: str, name: str, args) -> float:
    """Peak memory of one step of `name` (a model variant or an attention function)."""
    device = torch.device(args.device)
    if device.type == 'cuda':
        if kind.startswith('attention'):
            steps = attention_steps(args, device, attention_layers(kind))
        else:
            steps = {name: make_step(build(name, args), args, device)}
        return cuda_peak_memory_mib(steps[name], device)[0]
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(_cpu_peak_rss_mib, (kind, name, args))


def attention_layers(kind: str) -> int:
    """'attention 12' -> 12."""
    return int(kind.split()[1])


def _proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB; unlike ru_maxrss, VmHWM starts afresh at exec."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'no {field} in /proc/self/status')


def _cpu_peak_rss_mib(kind: str, name: str, args) -> float:
    torch.set_num_threads(args.threads)
    before = _proc_status_kib('VmRSS')
    device = torch.device('cpu')
    if kind.startswith('attention'):
        step = attention_steps(args, device, attention_layers(kind))[name]
    else:
        step = make_step(build(name, args), args, device)
    step()
    step()
    return (_proc_status_kib('VmHWM') - before) / 1024


def forward_flops(args) -> float:
    """Model FLOPs of one ViT-B/16 forward pass per image (matmuls only; a step is three times this)."""
    n, d, mlp, layers = (args.img_size // 16) ** 2 + 1, 768, 3072, 12
    per_layer = 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d
    return layers * per_layer + 2 * (n - 1) * 3 * 16 * 16 * d


def matmul_rate(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s of this GPU."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    synchronize(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start)


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every setting checked before anything is built: one line naming the value and what was expected."""
    for flag, least in (('batch', 1), ('repeats', 1), ('warmup', 0), ('threads', 1), ('attention_layers', 1)):
        if getattr(args, flag) < least:
            p.error(f"--{flag} {getattr(args, flag)}: expected an integer of at least {least}")
    patch = model_config(args).patches.size[0]
    if args.img_size < patch or args.img_size % patch:
        p.error(f"--img_size {args.img_size}: expected a positive multiple of the patch size, {patch}")
    try:
        orders = parse_orders(args.orders)
        if not orders:
            raise ValueError("expected at least one order, e.g. '0,1,2'")
        check_orders(orders, args.img_size // patch)
    except ValueError as error:
        p.error(f"--orders {args.orders}: {error}")
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; expected --device cpu")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--img_size', type=int, default=384)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--orders', default='0,1,2')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--repeats', type=int, default=5, help='timed rounds (the median is reported)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=2, help='CPU threads')
    p.add_argument('--attention_layers', type=int, default=12,
                   help='layers in the attention-alone comparison besides one (ViT-B/16 has 12)')
    p.add_argument('--no_memory', action='store_true', help='skip the peak-memory measurements')
    p.add_argument('--recipes', action='store_true',
                   help="time train.py's optimizer step under the vit and deit recipes and their loader transforms "
                        "(TRAR model) instead of the other tables")
    p.add_argument('--preset', choices=sorted(PRESETS),
                   help="another model than ViT-B/16: 'demo' is scripts/demo.sh's (its image size, batch, orders)")
    args = p.parse_args(argv)
    if args.preset:  # the preset's values are defaults: a flag given beside it still counts
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    check_args(p, args)
    sys.stdout.reconfigure(line_buffering=True)  # every row shows as soon as it is measured
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} threads'
    print(f"# {args.preset or 'ViT-B/16'} {args.img_size}px, batch {args.batch}, orders [{args.orders}], "
          f"{args.dtype}, compile {'on' if args.compile else 'off'}, {name}, torch {torch.__version__}")
    if args.recipes:
        print_recipes(args, device)
        return

    names = variants(args)
    step_times = time_rounds({n: make_step(build(n, args), args, device) for n in names}, args, device)
    depths = sorted({1, args.attention_layers})
    memory = {}

    def memory_cells(kind: str, name: str, reference: str) -> str:
        """Measure `name`'s peak memory now (unless --no_memory): 'MiB | ratio to the reference row'."""
        if args.no_memory:
            return '- | -'
        memory[kind, name] = peak_memory_mib(kind, name, args)
        return f"{memory[kind, name]:.0f} | {memory[kind, name] / memory[kind, reference]:.2f}x"

    print(f"\n| variant | step time (s) | vs plain | images/s | peak memory (MiB) | vs plain |")
    print("|---|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {step_times[n]:.3f} | {step_times[n] / step_times['plain']:.2f}x | "
              f"{args.batch / step_times[n]:.1f} | {memory_cells('model', n, 'plain')} |")
    if 'timm trar' in step_times:  # model/timm_trar.py's routed layer in timm's ViT against this repository's TRAR
        print(f"\ntimm trar / trar step time: {step_times['timm trar'] / step_times['trar']:.2f}x (target <= 1.05x)")
    attention_times = {}
    for layers in depths:
        times = attention_times[layers] = time_rounds(attention_steps(args, device, layers), args, device)
        label = '1 layer' if layers == 1 else f'{layers} layers, then backward (a training step\'s attention)'
        print(f"\n| attention alone, fwd+bwd, {label} | ms / layer | vs routed_attention | peak memory (MiB) | "
              "vs routed_attention |")
        print("|---|---|---|---|---|")
        for n in ATTENTION:  # routed_attention first: the reference of the ratios
            print(f"| {n} | {times[n] / layers * 1e3:.1f} | {times[n] / times['routed_attention']:.2f}x | "
                  f"{memory_cells(f'attention {layers}', n, 'routed_attention')} |")
    products = attention_times[1]['products_only']
    print(f"\nThe seven (N, N) x (N, d) products alone take {products * 1e3:.1f} ms per layer: no exact attention "
          f"that recomputes its scores can be more than {attention_times[1]['stacked (original)'] / products:.2f}x "
          f"faster than the stacked baseline (1 layer) on this device.")
    eval_times = time_rounds(eval_steps(args, device), args, device)
    print("\n| inference (no grad) | forward time (s) | images/s | vs trar soft |")
    print("|---|---|---|---|")
    for n, seconds in eval_times.items():
        print(f"| {n} | {seconds:.3f} | {args.batch / seconds:.1f} | {eval_times['trar soft'] / seconds:.2f}x |")
    if device.type == 'cuda' and not args.preset:  # forward_flops counts ViT-B/16's
        achieved = 3 * forward_flops(args) * args.batch / step_times['plain']
        rate = matmul_rate(device)
        print(f"plain ViT-B/16: {achieved / 1e12:.1f} TFLOP/s of model FLOPs = {achieved / rate:.0%} of the "
              f"measured bf16 matmul rate ({rate / 1e12:.0f} TFLOP/s)")


if __name__ == '__main__':
    command_line(main, 'bench.py')
