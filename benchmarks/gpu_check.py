"""One prepared GPU check: the CUDA tests, the sync audit, speed, memory and end-to-end runs, in <= 8 minutes.

    python3 benchmarks/gpu_check.py          # on one H100 / H200; results under $OUT (default output/gpu_check)
    python3 benchmarks/gpu_check.py --dry    # every section on tiny shapes on the CPU, in well under a minute

It runs under a bare image's python3 with no package registry: a missing `ml_collections` is installed from the
wheels in `.wheels/` (`pip download --no-deps -d .wheels ml_collections` on a machine with a registry).
Sections run in priority order, each inside a time budget and guarded, so one failure loses nothing else:

1. tests     the CUDA test files (pytest);
2. sync      a bf16 training step per routed-attention implementation under torch.cuda.set_sync_debug_mode('error');
3. steps     step time and peak memory (allocated and reserved), bf16, ViT-B/16 at 384 px batch 64 orders [0,1,2]
             and 224 px batch 128 orders [0,1,2,3]: plain, TRAR per implementation, the original stacked maps,
             timm's ViT; eager, then compiled;
4. mfu       plain ViT-B/16 model FLOPs utilisation against a measured bf16 matmul rate;
5. attention attention alone, fwd+bwd, per implementation and the baselines;
6. train     train.py end to end on digits: fp16 O1 and O2, bf16, bf16 with --compile;
7. ddp       a one-process NCCL run of train.py under torchrun;
8. loader    data-loader images/s with 4, 8 and 16 workers on synthetic ImageNet-sized JPEGs.

Every line is printed as it is measured and appended to gpu_check.log; gpu_check.json and gpu_check.md hold the
full tables; a short table and the targets close the output.
"""
import argparse
import contextlib
import functools
import gc
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / '.wheels'
CUDA_TEST_PATTERNS = ('test_*cuda*.py', 'test_triton*.py', 'test_flex*.py')
GPU_ONLY = ('flex', 'triton')  # implementations whose training step needs CUDA (CPU flex attention is forward-only)


def ensure_ml_collections() -> str:
    """Import ml_collections; when missing, install it from .wheels/ (no index) into a temporary folder that this
    process and its children (PYTHONPATH) import from."""
    try:
        import ml_collections  # noqa: F401
        return 'ml_collections: installed'
    except ImportError:
        pass
    wheels = sorted(WHEELS.glob('*.whl'))
    if not wheels:
        sys.exit(f"gpu_check: ml_collections is not installed and {WHEELS} holds no wheel; on a machine with a "
                 "package registry run: pip download --no-deps -d .wheels ml_collections")
    target = Path(tempfile.gettempdir()) / 'gpu_check_site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--upgrade',
                    '--target', str(target), *map(str, wheels)], check=True)
    sys.path.insert(0, str(target))
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, (str(target), os.environ.get('PYTHONPATH'))))
    importlib.invalidate_caches()
    import ml_collections  # noqa: F401
    return f"ml_collections: installed from {', '.join(w.name for w in wheels)} into {target}"


class Skip(Exception):
    """A section or row that cannot run here (no CUDA, no time left): reported as skipped, not failed."""


@dataclass
class Section:
    name: str
    budget: float  # seconds, on the GPU
    run: Callable[['Check'], str]  # returns the section's headline
    status: str = 'not run'
    headline: str = ''
    seconds: float = 0.0
    rows: list = field(default_factory=list)


@dataclass
class Shapes:
    """What the sections run: ViT-B/16 shapes on the GPU, tiny ones on the CPU (--dry)."""
    model_type: str  # of the TRAR and plain models (bench.build)
    steps: tuple  # (img_size, batch, orders) per step-time configuration
    attention: tuple  # (img_size, batch, orders) of the attention-alone comparison
    sync: tuple  # (img_size, batch, orders) of the sync audit
    warmup: int
    repeats: int
    train_steps: int
    workers: tuple
    loader_images: int
    loader_image_size: tuple  # (width, height) of the synthetic JPEGs
    loader_img_size: int  # what the training transform crops them to


FULL = Shapes(model_type='ViT-B_16', steps=((384, 64, '0,1,2'), (224, 128, '0,1,2,3')), attention=(384, 64, '0,1,2'),
              sync=(224, 8, '0,1,2,3'), warmup=2, repeats=5, train_steps=60, workers=(4, 8, 16),
              loader_images=1024, loader_image_size=(500, 375), loader_img_size=384)
DRY = Shapes(model_type='testing', steps=((32, 1, '0,1'),), attention=(32, 1, '0,1'), sync=(32, 1, '0,1'), warmup=0, repeats=1,
             train_steps=3, workers=(0, 2), loader_images=24, loader_image_size=(64, 48), loader_img_size=32)


class Check:
    """Where the check stands: device, shapes, time left, the sections' rows, the log."""

    def __init__(self, args: argparse.Namespace, out: Path):
        self.dry, self.out = args.dry, out
        self.shapes = DRY if args.dry else FULL
        self.device = torch.device('cuda' if torch.cuda.is_available() and not args.dry else 'cpu')
        self.cuda = self.device.type == 'cuda'
        self.log = open(out / 'gpu_check.log', 'w')
        self.start = time.monotonic()
        self.end = self.start + args.budget
        self.section_end = self.end
        self.section: Section | None = None
        self.work = Path(tempfile.mkdtemp(prefix='gpu_check_'))  # training runs and JPEGs: not under $OUT

    def line(self, text: str = '') -> None:
        print(text, flush=True)
        self.log.write(text + '\n')
        self.log.flush()

    def time_left(self) -> float:
        return self.section_end - time.monotonic()

    def need_cuda(self, what: str = '') -> None:
        if not self.cuda:
            raise Skip(f"no CUDA{': ' + what if what else ''}")

    def row(self, name: str, measure: Callable[[], dict], cost: float = 0.0) -> dict:
        """Run one measurement, guarded: its values, or why it was skipped, ran out of memory or failed."""
        row = {'name': name}
        try:
            if self.time_left() < cost:
                raise Skip(f"time budget ({self.time_left():.0f} s left, needs about {cost:.0f} s)")
            row.update(measure())
        except Skip as reason:
            row['skipped'] = str(reason)
        except torch.cuda.OutOfMemoryError as error:
            row['oom'] = str(error).splitlines()[0][:160]
        except Exception as error:  # noqa: BLE001: a failed row is recorded, the check goes on
            row['error'] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            self.log.write(traceback.format_exc())
        finally:
            free_memory()
        self.section.rows.append(row)
        self.line(f"  {self.section.name} | " + ' | '.join(f"{k} {format_value(v)}" for k, v in row.items()))
        return row

    def rows_named(self, section: str) -> dict:
        return {row['name']: row for s in SECTIONS if s.name == section for row in s.rows}

    def run_subprocess(self, command: list[str], **kwargs) -> tuple[int | None, list[str]]:
        """Run `command` from the repository root, each output line logged as it comes; killed at the section's
        budget (then the return code is None)."""
        self.log.write('$ ' + ' '.join(command) + '\n')
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, **kwargs)
        lines = []
        timer = _Killer(process, max(self.time_left(), 1.0))
        with timer:
            for text in process.stdout:
                lines.append(text.rstrip('\n'))
                self.line('    ' + lines[-1])
        process.wait()
        return (None if timer.fired else process.returncode), lines


class _Killer:
    """Kill a process group after `seconds` (a context manager around reading its output)."""

    def __init__(self, process: subprocess.Popen, seconds: float):
        self.process, self.fired = process, False
        self.timer = threading.Timer(seconds, self.kill)

    def kill(self) -> None:
        self.fired = self.process.poll() is None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def implementations() -> tuple[str, ...]:
    return tuple(getattr(trar, 'IMPLEMENTATIONS', ()))


def forced(name: str | None):
    """Routed attention forced to `name` inside the block (None: the device's default)."""
    use = getattr(trar, 'use_implementation', None)
    return use(name) if use is not None and name is not None else contextlib.nullcontext()


def default_implementation(device: torch.device) -> str:
    pick = getattr(trar, 'implementation_for', None)
    return pick(device) if pick is not None else 'default'


def under(name: str | None, step: Callable[[], None]) -> Callable[[], None]:
    """`step` run with routed attention forced to `name`."""
    def run():
        with forced(name):
            step()
    return run


def bench_args(check: Check, img_size: int, batch: int, orders: str, compile: bool = False) -> argparse.Namespace:
    """The settings bench.py's functions read."""
    return argparse.Namespace(model_type=check.shapes.model_type, img_size=img_size, batch=batch, orders=orders,
                              dtype='bf16' if check.cuda else 'fp32', compile=compile,
                              warmup=check.shapes.warmup + int(compile), repeats=check.shapes.repeats,
                              device=check.device.type, threads=torch.get_num_threads())


def time_and_memory(check: Check, step: Callable[[], None], args: argparse.Namespace) -> dict:
    """Median milliseconds of `step` (bench.time_rounds) and, on CUDA, its peak memory allocated and reserved."""
    values = {'ms': bench.time_rounds({'step': step}, args, check.device)['step'] * 1e3}
    if check.cuda:
        values['alloc_mib'], values['reserved_mib'] = bench.cuda_peak_memory_mib(step, check.device)
    return values


# Sections --------------------------------------------------------------------------------------------------------


def section_tests(check: Check) -> str:
    files = sorted({str(p.relative_to(ROOT)) for pattern in CUDA_TEST_PATTERNS for p in (ROOT / 'tests').glob(pattern)})
    if not files:
        raise Skip('no CUDA test files')
    collect = ['--collect-only'] if check.dry else []  # --dry: that the files import and their tests collect
    code, lines = check.run_subprocess([sys.executable, '-m', 'pytest', '-q', '-rfEs', '--durations=8', *collect,
                                        *files])
    summary = next((line for line in reversed(lines)
                    if re.search(r'\d+ (passed|failed|skipped|errors?|tests? collected)', line)), '')
    counts = {kind: int(n) for n, kind in re.findall(r'(\d+) (passed|failed|skipped|errors?|tests? collected)', summary)}
    failed = [line for line in lines if line.startswith(('FAILED', 'ERROR'))]
    check.section.rows.append({'name': 'pytest ' + ' '.join(files), 'exit': code, **counts,
                               'failed_tests': ' ; '.join(failed)[:2000]})
    if code is None:
        raise RuntimeError(f"pytest ran past the section's budget; so far: {summary or 'no summary'}")
    if code != 0:
        raise RuntimeError(summary or f'pytest exit status {code}')
    return summary.strip('= ')


def section_sync(check: Check) -> str:
    img_size, batch, orders = check.shapes.sync
    args = bench_args(check, img_size, batch, orders)
    names = implementations() or (None,)

    def audit(name):
        if name in GPU_ONLY:
            check.need_cuda('its training step needs CUDA')
        model = bench.build('trar', args).to(check.device).train()
        precision = Precision.from_args(True, 'O2', 'bf16', 0, check.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        images = torch.randn(batch, 3, img_size, img_size, device=check.device)
        labels = torch.randint(0, 1000, (batch,), device=check.device)

        def step():  # the training step of utils.engine, without its per-step loss logging (which reads the loss)
            with forced(name), precision.autocast():
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            precision.backward(loss)
            precision.step(optimizer, model.parameters(), max_grad_norm=1.0)
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: compilation, block masks, autotuning may sync
        if not check.cuda:
            step()
            return {'audit': 'CPU stand-in: the step ran, nothing to audit without CUDA'}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        return {'audit': 'no host sync'}

    rows = [check.row(f'trar [{name or "default"}] bf16 step', functools.partial(audit, name), cost=8)
            for name in names]
    clean = [r['name'] for r in rows if r.get('audit') == 'no host sync']
    if any('error' in r for r in rows):
        raise RuntimeError('host syncs or failures: ' + ', '.join(r['name'] for r in rows if 'error' in r))
    if not check.cuda:
        raise Skip('no CUDA: the steps ran on the CPU without the audit')
    return f"no host sync in {', '.join(clean)}"


def step_rows(check: Check, compiled: bool) -> list[tuple[str, str, Callable[[], dict], float]]:
    """(configuration, variant, measure, expected seconds) of the step-time rows: plain, TRAR per implementation
    (compiled: the device's default only), the stacked maps (eager only), timm."""
    rows = []
    for img_size, batch, orders in check.shapes.steps:
        args = bench_args(check, img_size, batch, orders, compile=compiled)
        tag = f"{img_size}px b{batch} [{orders}] {'compiled' if compiled else 'eager'}"

        def measure(variant, name=None, args=args):
            if compiled and not check.cuda:
                raise Skip('no CUDA: Inductor on the CPU takes minutes')
            if name in GPU_ONLY:
                check.need_cuda('its training step needs CUDA')
            if variant == 'timm' and check.dry:
                raise Skip('--dry: timm builds a full ViT-B/16')
            with forced(name):
                step = under(name, bench.make_step(bench.build(variant, args), args, check.device))
                values = time_and_memory(check, step, args)
            values['images_s'] = args.batch / values['ms'] * 1e3
            return values

        trar_names = [None] if compiled else (list(implementations()) or [None])
        variants = [('plain', None)] + [('trar', name) for name in trar_names] + [('stacked', None)] * (not compiled)
        if timm is not None:
            variants.append(('timm', None))
        for variant, name in variants:
            label = variant if variant != 'trar' else f"trar [{name or default_implementation(check.device)}]"
            rows.append((tag, label, functools.partial(measure, variant, name), 60 if compiled else 8))
    return sorted(rows, key=lambda row: compiled and row[1] == 'timm')  # compiled: timm's rows last


def section_steps(check: Check) -> str:
    def with_ratios(measure: Callable[[], dict], tag: str) -> dict:
        """The row's values and their ratios to the plain model's of the same configuration."""
        values, plain = measure(), check.rows_named('steps').get(f'{tag} plain', {})
        for key, ratio in (('ms', 'time_vs_plain'), ('alloc_mib', 'alloc_vs_plain')):
            if key in values and key in plain:
                values[ratio] = values[key] / plain[key]
        return values

    ratios = []
    for compiled in (False, True):  # every eager row first: compilation takes most of the time
        for tag, label, measure, cost in step_rows(check, compiled):
            row = check.row(f'{tag} {label}', functools.partial(with_ratios, measure, tag), cost)
            if label.startswith('trar') and 'time_vs_plain' in row:
                ratios.append(f"{tag.split(' ')[0]} {'compiled' if compiled else 'eager'} {label[5:]} "
                              f"{row['time_vs_plain']:.2f}x")
    if any('error' in r for r in check.section.rows):
        raise RuntimeError('failed rows: ' + ', '.join(r['name'] for r in check.section.rows if 'error' in r))
    return 'TRAR / plain time: ' + ', '.join(ratios)


def section_mfu(check: Check) -> str:
    check.need_cuda()
    rate = bench.matmul_rate(check.device)
    check.section.rows.append({'name': 'bf16 matmul 8192^3', 'tflops': rate / 1e12})
    check.line(f"  mfu | measured bf16 matmul rate {rate / 1e12:.0f} TFLOP/s")
    results = []
    for img_size, batch, orders in check.shapes.steps:
        args = bench_args(check, img_size, batch, orders)
        steps = check.rows_named('steps')
        for mode in ('compiled', 'eager'):
            plain = steps.get(f"{img_size}px b{batch} [{orders}] {mode} plain", {})
            if 'ms' in plain:
                achieved = 3 * bench.forward_flops(args) * batch / (plain['ms'] / 1e3)
                row = check.row(f"{img_size}px b{batch} plain {mode}",
                                lambda: {'model_tflops': achieved / 1e12, 'mfu': achieved / rate})
                results.append(f"{img_size}px {mode} {row['mfu']:.0%}")
    if not results:
        raise Skip('no plain ViT-B/16 step time measured')
    return 'plain ViT-B/16 MFU: ' + ', '.join(results)


def section_attention(check: Check) -> str:
    img_size, batch, orders = check.shapes.attention
    args = bench_args(check, img_size, batch, orders)
    steps = bench.attention_steps(args, check.device, layers=1)
    measured = {}
    for name in [f'routed_attention [{n}]' for n in implementations() or ('default',)] + list(bench.ATTENTION)[1:]:
        impl = name[len('routed_attention ['):-1] if name.startswith('routed_attention [') else None
        step = steps['routed_attention'] if impl else steps[name]

        def measure(step=step, impl=impl):
            if impl in GPU_ONLY:
                check.need_cuda('its backward needs CUDA')
            return time_and_memory(check, under(None if impl == 'default' else impl, step), args)
        measured[name] = check.row(f"{img_size}px b{batch} [{orders}] {name}", measure, cost=3)
    stacked = measured['stacked (original)']
    best = []
    for name, row in measured.items():
        if 'ms' in row and 'ms' in stacked:
            row['speedup_vs_stacked'] = stacked['ms'] / row['ms']
            if 'alloc_mib' in row:
                row['memory_vs_stacked'] = stacked['alloc_mib'] / row['alloc_mib']
            if name.startswith('routed'):
                best.append(f"{name[len('routed_attention '):]} {row['speedup_vs_stacked']:.2f}x faster"
                            + (f", {row['memory_vs_stacked']:.1f}x less memory" if 'memory_vs_stacked' in row else ''))
    if any('error' in r for r in measured.values()):
        raise RuntimeError('failed rows: ' + ', '.join(n for n, r in measured.items() if 'error' in r))
    return 'vs stacked: ' + '; '.join(best)


def train_command(check: Check, name: str, *flags: str, launcher: tuple[str, ...] = ()) -> list[str]:
    steps = check.shapes.train_steps
    return [*(launcher or (sys.executable,)), 'train.py', '--name', name, '--dataset', 'digits',
            '--model_type', 'testing', '--img_size', '32', '--pretrained_dir', 'none', '--output_dir', str(check.work),
            '--train_batch_size', '64', '--eval_batch_size', '360', '--num_steps', str(steps),
            '--eval_every', str(steps), '--warmup_steps', str(min(10, steps - 1)), '--learning_rate', '0.1',
            '--num_workers', '2', '--device', check.device.type, *flags]


def train_row(check: Check, name: str, *flags: str, launcher: tuple[str, ...] = (), cost: float = 10) -> dict:
    def measure():
        if '--compile' in flags and not check.cuda:
            raise Skip('no CUDA: Inductor on the CPU takes minutes')
        code, lines = check.run_subprocess(train_command(check, name, *flags, launcher=launcher))
        if code != 0:
            raise RuntimeError(f"exit status {code}: {(lines or ['no output'])[-1]}")
        results = json.loads(next(line for line in reversed(lines) if line.startswith('{')))  # train.py's summary
        return {key: results[key] for key in ('best_acc', 'steps', 'seconds', 'peak_memory_mib', 'world_size')}
    return check.row(name, measure, cost)


def section_train(check: Check) -> str:
    runs = (('fp16_O1', '--fp16', '--fp16_opt_level', 'O1'), ('fp16_O2', '--fp16', '--fp16_opt_level', 'O2'),
            ('bf16', '--fp16', '--amp_dtype', 'bf16'), ('bf16_compile', '--fp16', '--amp_dtype', 'bf16', '--compile'))
    if check.dry:  # one run checks the path; the others differ only on a GPU
        runs = [run for run in runs if run[0] == 'bf16']
    rows = [train_row(check, name, *flags, cost=40 if '--compile' in flags else 8) for name, *flags in runs]
    if any('error' in r for r in rows):
        raise RuntimeError('failed runs: ' + ', '.join(r['name'] for r in rows if 'error' in r))
    return ', '.join(f"{r['name']} acc {r['best_acc']:.2f}" for r in rows if 'best_acc' in r)


def section_ddp(check: Check) -> str:
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1')
    row = train_row(check, 'torchrun_1_process', '--fp16', '--amp_dtype', 'bf16', launcher=launcher)
    if 'error' in row:
        raise RuntimeError(f"torchrun: {row['error']}")
    backend = 'NCCL' if check.cuda else 'gloo (CPU stand-in)'
    return f"{backend}, world size {row.get('world_size')}, acc {row.get('best_acc', float('nan')):.2f}"


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """`count` JPEGs of `size` in 8 class folders, smooth noise plus grain: about a photograph's file size."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.integers(-12, 13, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        target = folder / f'class{i % 8}'
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f'{i}.JPEG', quality=90)


def section_loader(check: Check) -> str:
    from torch.utils.data import DataLoader
    shapes = check.shapes
    root = check.work / 'jpegs'
    started = time.perf_counter()
    write_jpegs(root / 'train', shapes.loader_images, shapes.loader_image_size)
    size = sum(p.stat().st_size for p in (root / 'train').rglob('*.JPEG')) / shapes.loader_images / 1024
    check.line(f"  loader | wrote {shapes.loader_images} JPEGs of {shapes.loader_image_size[0]}x"
               f"{shapes.loader_image_size[1]}, {size:.0f} KiB each, in {time.perf_counter() - started:.1f} s")
    dataset = Augmented(load_split('imagenet', str(root), True), get_train_transform(shapes.loader_img_size, 'flip'), 0)
    batch = 64 if check.cuda else 4
    collate = functools.partial(collate_skipping_none, image_shape=(3, shapes.loader_img_size, shapes.loader_img_size))

    def measure(workers: int) -> dict:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                            pin_memory=check.cuda, drop_last=True)
        images, start = 0, None
        for _ in range(2):  # two passes over the files, the first batch (workers starting) untimed
            for pictures, *_ in loader:
                if start is None:
                    start = time.perf_counter()
                    continue
                images += len(pictures)
        return {'images_s': images / (time.perf_counter() - start), 'img_size': shapes.loader_img_size}

    rows = [check.row(f'{workers} workers', functools.partial(measure, workers), cost=5) for workers in shapes.workers]
    if any('error' in r for r in rows):
        raise RuntimeError('failed rows: ' + ', '.join(r['name'] for r in rows if 'error' in r))
    return ', '.join(f"{r['name']} {r['images_s']:.0f} img/s" for r in rows if 'images_s' in r)


SECTIONS = [Section('tests', 115, section_tests), Section('sync', 35, section_sync),
            Section('steps', 160, section_steps), Section('mfu', 10, section_mfu),
            Section('attention', 25, section_attention), Section('train', 65, section_train),
            Section('ddp', 20, section_ddp), Section('loader', 30, section_loader)]


# Report ----------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        lines.append('| ' + ' | '.join(format_value(row.get(c, '')).replace('|', '/') for c in columns) + ' |')
    return lines


def targets(check: Check) -> list[dict]:
    """The issue's GPU targets next to what this run measured (best TRAR row per configuration)."""
    steps, attention = check.rows_named('steps'), check.rows_named('attention')
    found = []
    for img_size, batch, orders in check.shapes.steps:
        trar_rows = [r for n, r in steps.items() if n.startswith(f"{img_size}px b{batch} [{orders}]")
                     and ' trar [' in n and 'time_vs_plain' in r]
        if trar_rows:
            best = min(trar_rows, key=lambda r: r['time_vs_plain'])
            found.append({'measure': f'TRAR / plain step time, {img_size} px [{orders}] ({best["name"]})',
                          'target': '<= 1.10x', 'measured': f"{best['time_vs_plain']:.2f}x",
                          'met': best['time_vs_plain'] <= 1.10})
            if 'alloc_vs_plain' in best:
                found.append({'measure': f'TRAR / plain peak memory, {img_size} px [{orders}]', 'target': '<= 1.10x',
                              'measured': f"{best['alloc_vs_plain']:.2f}x", 'met': best['alloc_vs_plain'] <= 1.10})
        for mode in ('eager', 'compiled'):
            plain, timm_row = (steps.get(f"{img_size}px b{batch} [{orders}] {mode} {v}", {}) for v in ('plain', 'timm'))
            if 'ms' in plain and 'ms' in timm_row:
                ratio = plain['ms'] / timm_row['ms']
                found.append({'measure': f'plain / timm step time, {img_size} px, {mode}', 'target': '<= 1.00x',
                              'measured': f'{ratio:.2f}x', 'met': ratio <= 1.0})
    routed = [r for n, r in attention.items() if 'routed_attention' in n and 'speedup_vs_stacked' in r]
    if routed:
        best = max(routed, key=lambda r: r['speedup_vs_stacked'])
        memory = best.get('memory_vs_stacked')
        found.append({'measure': f"routed attention vs stacked maps, fwd+bwd ({best['name']})",
                      'target': '>= 3x faster, >= 5x less memory',
                      'measured': f"{best['speedup_vs_stacked']:.2f}x faster"
                                  + (f", {memory:.1f}x less memory" if memory else ''),
                      'met': best['speedup_vs_stacked'] >= 3 and (memory or 0) >= 5})
    for row in next(s for s in SECTIONS if s.name == 'mfu').rows:
        if 'mfu' in row:
            found.append({'measure': f"plain ViT-B/16 MFU, {row['name']}", 'target': '>= 45%',
                          'measured': f"{row['mfu']:.0%}", 'met': row['mfu'] >= 0.45})
    return found


def write_tables(check: Check, header: dict) -> list[dict]:
    """gpu_check.json and gpu_check.md with every row so far (rewritten after each section); the targets."""
    try:
        goals = targets(check)
    except Exception as error:  # noqa: BLE001: the rows matter more than the summary of them
        goals = [{'measure': 'targets', 'target': '', 'measured': f'{type(error).__name__}: {error}', 'met': False}]
    document = {**header, 'seconds': time.monotonic() - check.start, 'targets': goals,
                'sections': [{'name': s.name, 'status': s.status, 'headline': s.headline, 'seconds': s.seconds,
                              'budget': s.budget, 'rows': s.rows} for s in SECTIONS]}
    (check.out / 'gpu_check.json').write_text(json.dumps(document, indent=1, default=str) + '\n')
    md = ['# gpu_check', '', ', '.join(f'{k}: {v}' for k, v in header.items()), '']
    for s in SECTIONS:
        md += [f'## {s.name}: {s.status} ({s.seconds:.0f} s)', '', s.headline, '']
        if s.rows:
            md += markdown_table(s.rows) + ['']
    if goals:
        md += ['## targets', ''] + markdown_table(goals) + ['']
    (check.out / 'gpu_check.md').write_text('\n'.join(md))
    return goals


def print_summary(check: Check, goals: list[dict]) -> None:
    check.line('\n| section | status | seconds | result |')
    check.line('|---|---|---|---|')
    for s in SECTIONS:
        check.line(f'| {s.name} | {s.status} | {s.seconds:.0f} | {s.headline[:160]} |')
    if goals:
        check.line('\n| target | wanted | measured | met |')
        check.line('|---|---|---|---|')
        for goal in goals:
            check.line(f"| {goal['measure']} | {goal['target']} | {goal['measured']} | {'yes' if goal['met'] else 'no'} |")
    check.line(f"\nwrote {check.out / 'gpu_check.md'}, gpu_check.json and gpu_check.log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry', action='store_true', help='tiny shapes on the CPU: checks that every section runs')
    p.add_argument('--budget', type=float, default=None,
                   help='seconds for all sections (default 460 on a GPU, 600 in --dry)')
    p.add_argument('--out', default=None, help='output folder (default $OUT, else output/gpu_check)')
    p.add_argument('--sections', default=','.join(s.name for s in SECTIONS), help='comma-separated, in order')
    args = p.parse_args()
    args.budget = args.budget or (600.0 if args.dry else 460.0)  # --dry checks that it runs, not how fast
    out = Path(args.out or os.environ.get('OUT') or ROOT / 'output' / 'gpu_check')
    out.mkdir(parents=True, exist_ok=True)
    check = Check(args, out)
    wanted = args.sections.split(',')
    unknown = set(wanted) - {s.name for s in SECTIONS}
    if unknown:
        p.error(f"--sections {args.sections}: unknown {', '.join(sorted(unknown))}; expected some of "
                + ', '.join(s.name for s in SECTIONS))
    for name in ('recompile_limit', 'cache_size_limit'):  # many models share one forward: keep their graphs
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    header = {'device': torch.cuda.get_device_name() if check.cuda else f'CPU ({os.cpu_count()} cores)',
              'torch': torch.__version__, 'python': platform.python_version(), 'dry': check.dry,
              'implementations': ', '.join(implementations()) or 'not found',
              'default_implementation': default_implementation(check.device), 'setup': SETUP}
    check.line('# gpu_check: ' + ', '.join(f'{k} {v}' for k, v in header.items()))
    planned, goals = 0.0, []
    total = sum(s.budget for s in SECTIONS if s.name in wanted)
    for section in SECTIONS:
        if section.name not in wanted:
            section.status = 'skipped: not asked for'
            continue
        share = section.budget * args.budget / total
        planned += share  # time one section leaves is the next one's
        now = time.monotonic()
        check.section, check.section_end = section, min(check.end, max(check.start + planned, now + share / 2))
        check.line(f"\n== {section.name} (until +{check.section_end - check.start:.0f} s)")
        try:
            if check.time_left() <= 0:
                raise Skip('time budget')
            section.headline, section.status = section.run(check), 'ok'
        except Skip as reason:
            section.status = f'skipped: {reason}'
        except Exception as error:  # noqa: BLE001: a failed section is recorded, the next one runs
            section.status = 'failed'
            section.headline = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            check.log.write(traceback.format_exc())
        finally:
            free_memory()
        section.seconds = time.monotonic() - now
        goals = write_tables(check, header)
        check.line(f"== {section.name}: {section.status} in {section.seconds:.0f} s: {section.headline}")
    print_summary(check, goals)


if __name__ == '__main__':
    sys.stdout.reconfigure(line_buffering=True)
    SETUP = ensure_ml_collections()  # before anything imports the project (its config needs ml_collections)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import bench  # noqa: E402
    from model import attention as trar  # noqa: E402
    from utils.data_utils import Augmented, collate_skipping_none, get_train_transform, load_split  # noqa: E402
    from utils.engine import Precision  # noqa: E402
    try:
        import timm  # noqa: F401
    except ImportError:
        timm = None
    main()
