"""One prepared GPU check: correctness tests, speed, memory, tuning and end-to-end runs, inside one time budget.

    python3 benchmarks/gpu_check.py          # on one H100 / H200; results under $OUT (default output/gpu_check)
    python3 benchmarks/gpu_check.py --dry    # every section on tiny shapes on the CPU, in under two minutes

It runs under a bare image's python3 with no package registry: a missing `ml_collections` is installed from the
wheels in `.wheels/` (`pip download --no-deps -d .wheels ml_collections` on a machine with a registry).
Sections run most valuable first, each inside a time budget and guarded, so one failure or overrun loses nothing
else (`SECTIONS`, at the end of the sections, lists them; a new section is a function added there):

1. tests      the CUDA tests, most valuable first: Triton, the other implementations against float64, the sync
              audit, then flex, then end to end (pytest -v, so a run cut short still names each result);
2. steps      eager step time and peak memory, bf16, ViT-B/16 at 384 px batch 64 orders [0,1,2] and 224 px batch
              128 orders [0,1,2,3]: plain and TRAR per implementation first, then the stacked maps and timm;
3. attention  attention alone, fwd+bwd, at both shapes: routed attention per implementation against flash SDPA
              and the stacked maps;
4. sync       a bf16 ViT-B/16 training step per implementation under torch.cuda.set_sync_debug_mode('error');
5. tune       flex block sizes and the Triton kernels' launch configurations, swept; the fastest kept for the run;
6. compiled   compiled plain, TRAR (the fastest eager implementation only) and timm step rows;
7. mfu        plain ViT-B/16 model FLOPs utilisation against a measured bf16 matmul rate;
8. train      train.py end to end on digits: bf16 with --compile once, fp16 O1 / O2 and bf16 eager;
9. ddp        a one-process NCCL run of train.py under torchrun;
10. loader    benchmarks/loader.py: float32 and uint8 pipelines, 4, 8 and 16 workers, ImageNet-like JPEGs from
              photographs, tar shards, and GPU decoding (torchvision.io.decode_jpeg on CUDA) as a row.

A row that would not fit the time left is skipped, a subprocess at its section's end is killed and reported as
"cut at N s" (not as a failure), and a watchdog writes the tables and exits if the whole run outlasts its budget
(a hang in this process included). Every line is printed as it is measured and appended to gpu_check.log;
gpu_check.json and gpu_check.md hold the full tables (rewritten after each section); a short table, the targets
and the tuned settings close the output.
"""
import argparse
import contextlib
import faulthandler
import functools
import gc
import importlib
import importlib.util
import json
import math
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
GPU_ONLY = ('flex', 'triton')  # implementations whose training step needs CUDA (CPU flex attention is forward-only)
WATCHDOG_GRACE = 45.0  # seconds past --budget before the watchdog writes the tables and ends the run
DEFAULT_BUDGET = {True: 600.0, False: 480.0}  # --dry checks that it runs, not how fast; a GPU run fits 600 s

# The `tests` section's pytest arguments, most valuable first (pytest runs them in this order): each group is a
# name and its node ids. The Triton kernels' interpreted tests and tests/attention/test_flex.py run in the CPU suite.
CUDA_TESTS = 'tests/attention/test_attention_cuda.py::'
TESTS = (
    ('triton vs float64 and flash', 'tests/attention/test_triton_kernel.py::test_cuda_error_no_worse_than_flash_sdpa'),
    ('implementations vs float64', CUDA_TESTS + 'test_implementation_matches_formula_forward_and_backward'),
    ('binarized vs float64', CUDA_TESTS + 'test_binarized_dispatch_matches_formula'),
    ('sync audit', CUDA_TESTS + 'test_training_step_never_waits_for_the_host'),
    ('flex vs float64', CUDA_TESTS + 'test_flex_matches_formula_forward_and_backward'),
    ('flex graph breaks', CUDA_TESTS + 'test_compiled_model_has_no_graph_break_on_cuda'),
    ('end to end', 'tests/training/test_cuda_training.py'),
)


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


def import_project() -> None:
    """The project's modules, as globals of this module (after `ensure_ml_collections`: its config needs it)."""
    global bench, trar, flex, timm, Augmented, collate_skipping_none, get_train_transform, load_split, Precision
    for path in (ROOT, ROOT / 'benchmarks'):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import bench
    import model.attention.flex as flex
    from model import attention as trar
    from utils.data_utils import Augmented, collate_skipping_none, load_split
    from utils.images import get_train_transform
    from utils.engine import Precision
    try:
        import timm
    except ImportError:
        timm = None


class Skip(Exception):
    """A section or row that cannot run here (no CUDA, no time left): reported as skipped, not failed."""


class Cut(Exception):
    """A section or row stopped at its time budget: reported as 'cut at N s', not failed."""


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
    steps: tuple  # (img_size, batch, orders) per step-time and attention-alone configuration
    sync: tuple  # (img_size, batch, orders) of the sync audit
    warmup: int
    repeats: int
    train_steps: int
    workers: tuple
    loader_images: int
    loader_image_size: tuple  # (width, height) of the synthetic JPEGs
    loader_img_size: int  # what the training transform crops them to


FULL = Shapes(model_type='ViT-B_16', steps=((384, 64, '0,1,2'), (224, 128, '0,1,2,3')), sync=(224, 8, '0,1,2,3'),
              warmup=2, repeats=5, train_steps=60, workers=(4, 8, 16), loader_images=1024,
              loader_image_size=(500, 375), loader_img_size=384)
DRY = Shapes(model_type='testing', steps=((32, 1, '0,1'),), sync=(32, 1, '0,1'), warmup=1, repeats=1, train_steps=3,
             workers=(0, 2), loader_images=24, loader_image_size=(64, 48), loader_img_size=32)


class Check:
    """Where the check stands: device, shapes, time left, the sections' rows, the log, the running subprocess."""

    def __init__(self, args: argparse.Namespace, out: Path, log):
        self.dry, self.out, self.log = args.dry, out, log
        self.shapes = DRY if args.dry else FULL
        self.device = torch.device('cuda' if torch.cuda.is_available() and not args.dry else 'cpu')
        self.cuda = self.device.type == 'cuda'
        self.start = time.monotonic()
        self.end = self.start + args.budget
        self.section_end = self.end
        self.section: Section | None = None
        self.process: subprocess.Popen | None = None
        self.tuned: dict = {}  # what the tune section picked, for the summary
        self.section_started = self.start
        self.work = Path(tempfile.mkdtemp(prefix='gpu_check_'))  # training runs and JPEGs: not under $OUT
        self.lock = threading.Lock()  # the watchdog and the main thread both write the tables

    def line(self, text: str = '') -> None:
        print(text, flush=True)
        self.log.write(text + '\n')
        self.log.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def time_left(self) -> float:
        return self.section_end - time.monotonic()

    def need_cuda(self, what: str = '') -> None:
        if not self.cuda:
            raise Skip(f"no CUDA{': ' + what if what else ''}")

    def row(self, name: str, measure: Callable[[], dict], cost: float = 0.0) -> dict:
        """Run one measurement, guarded: its values, or why it was skipped, cut, ran out of memory or failed."""
        row = {'name': name}
        try:
            if self.time_left() < cost:
                raise Skip(f"time budget ({self.time_left():.0f} s left, needs about {cost:.0f} s)")
            row.update(measure())
        except Skip as reason:
            row['skipped'] = str(reason)
        except Cut as reason:
            row['cut'] = str(reason)
        except torch.cuda.OutOfMemoryError as error:
            row['oom'] = str(error).splitlines()[0][:160]
        except Exception as error:  # noqa: BLE001: a failed row is recorded, the check goes on
            row['error'] = one_line(error)
            self.log.write(traceback.format_exc())
        finally:
            free_memory()
        self.section.rows.append(row)
        self.line(f"  {self.section.name} | " + ' | '.join(f"{k} {format_value(v)}" for k, v in row.items()))
        return row

    def rows_named(self, section: str) -> dict:
        return {row['name']: row for s in SECTIONS if s.name == section for row in s.rows}

    def run_subprocess(self, command: list[str], env: dict | None = None) -> tuple[int | None, list[str]]:
        """Run `command` from the repository root, each output line logged as it comes; killed at the section's
        end (then the return code is None)."""
        self.log.write('$ ' + ' '.join(command) + '\n')
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env=None if env is None else {**os.environ, **env})
        self.process, lines = process, []
        timer = _Killer(process, max(self.time_left(), 1.0))
        with timer:
            for text in process.stdout:
                lines.append(text.rstrip('\n'))
                self.line('    ' + lines[-1])
        process.wait()
        self.process = None
        return (None if timer.fired else process.returncode), lines

    def kill_subprocess(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)


class _Killer:
    """Kill a process group after `seconds` (a context manager around reading its output)."""

    def __init__(self, process: subprocess.Popen, seconds: float):
        self.process, self.fired = process, False
        self.timer = threading.Timer(seconds, self.kill)
        self.timer.daemon = True

    def kill(self) -> None:
        self.fired = self.process.poll() is None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


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


def under(name: str | None, step: Callable[[], None], *contexts) -> Callable[[], None]:
    """`step` run with routed attention forced to `name` (and inside `contexts`, factories of context managers)."""
    def run():
        with forced(name), contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
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


def config_tag(img_size: int, batch: int, orders: str) -> str:
    return f"{img_size}px b{batch} [{orders}]"


def failed_rows(check: Check) -> None:
    """Raise (the section fails) when any of its rows failed; rows cut or skipped are not failures."""
    failed = [r['name'] for r in check.section.rows if 'error' in r]
    if failed:
        raise RuntimeError('failed rows: ' + ', '.join(failed))


# Sections --------------------------------------------------------------------------------------------------------


RESULT = re.compile(r'^(tests/\S+?)(?:\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))\b')


def test_group(node: str) -> str:
    return next((name for name, prefix in TESTS if node.startswith(prefix)), 'other')


def section_tests(check: Check) -> str:
    """pytest over TESTS in their order, -v so that every result has its line: counted per group as they come."""
    missing = sorted({prefix.split('::')[0] for _, prefix in TESTS} - {p for p in map(str, tests_present())})
    if missing:
        raise RuntimeError(f"test files missing: {', '.join(missing)}")
    started = time.monotonic()
    code, lines = check.run_subprocess([sys.executable, '-m', 'pytest', '-v', '--tb=line', '-rfE', '--durations=10',
                                        '-p', 'no:randomly', *(prefix for _, prefix in TESTS)])
    counts = {name: {} for name, _ in TESTS}
    running = ''
    for line in lines:
        match = RESULT.match(line)
        if match:
            group = counts.setdefault(test_group(match.group(1)), {})
            group[match.group(2).lower()] = group.get(match.group(2).lower(), 0) + 1
            running = ''
        elif line.startswith('tests/') and '::' in line:
            running = line.split()[0]  # a test whose result line never came: the one running when cut
    for name, found in counts.items():
        check.section.rows.append({'name': name, **found})
        check.line(f"  tests | {name} | " + ', '.join(f'{n} {kind}' for kind, n in found.items()))
    failed = [line for line in lines if line.startswith(('FAILED', 'ERROR'))]
    total = {kind: sum(found.get(kind, 0) for found in counts.values()) for kind in ('passed', 'failed', 'skipped',
                                                                                       'error')}
    summary = ', '.join(f'{n} {kind}' for kind, n in total.items() if n)
    if failed or total['failed'] or total['error']:
        raise RuntimeError(f"{summary}: {' ; '.join(failed)[:1500]}")
    if code is None:
        raise Cut(f"cut at {time.monotonic() - started:.0f} s: {summary or 'no result'} so far"
                  + (f', {running} running' if running else ''))
    if code != 0:
        raise RuntimeError(f'pytest exit status {code}: {summary}')
    return summary


def tests_present() -> list[Path]:
    return [p.relative_to(ROOT) for p in (ROOT / 'tests').rglob('test_*.py')]


def step_measure(check: Check, args: argparse.Namespace, variant: str, name: str | None = None) -> Callable[[], dict]:
    """The measurement of one step-time row: median ms, peak memory, images/s, ratios to the same config's plain."""
    tag = config_tag(args.img_size, args.batch, args.orders)

    def measure():
        if args.compile and not check.cuda:
            raise Skip('no CUDA: Inductor on the CPU takes minutes')
        if name in GPU_ONLY:
            check.need_cuda('its training step needs CUDA')
        if variant == 'timm' and timm is None:
            raise Skip('timm is not installed')
        if variant == 'timm' and check.dry:
            raise Skip('--dry: timm builds a full ViT-B/16')
        with forced(name):
            step = under(name, bench.make_step(bench.build(variant, args), args, check.device))
            values = time_and_memory(check, step, args)
        values['images_s'] = args.batch / values['ms'] * 1e3
        mode = 'compiled' if args.compile else 'eager'
        plain = check.rows_named(check.section.name).get(f'{tag} {mode} plain', {})
        for key, ratio in (('ms', 'time_vs_plain'), ('alloc_mib', 'alloc_vs_plain')):
            if key in values and key in plain:
                values[ratio] = values[key] / plain[key]
        return values
    return measure


def trar_label(check: Check, name: str | None) -> str:
    return f"trar [{name or default_implementation(check.device)}]"


def section_steps(check: Check) -> str:
    """Eager rows: plain and TRAR per implementation at every configuration first (the ratios), then the stacked
    maps and timm."""
    names = list(implementations()) or [None]
    first = [(variant, name) for variant, name in [('plain', None)] + [('trar', n) for n in names]]
    for rows in (first, [('stacked', None), ('timm', None)]):
        for img_size, batch, orders in check.shapes.steps:
            args = bench_args(check, img_size, batch, orders)
            for variant, name in rows:
                label = trar_label(check, name) if variant == 'trar' else variant
                check.row(f'{config_tag(img_size, batch, orders)} eager {label}',
                          step_measure(check, args, variant, name), cost=8)
    failed_rows(check)
    fastest = fastest_eager(check)
    return (f"TRAR / plain: {ratio_summary(check.section.rows)}"
            + (f"; fastest eager implementation: {fastest}" if fastest else ''))


def ratio_summary(rows: list[dict]) -> str:
    return ', '.join(f"{r['name'].split(' ')[0]} {r['name'].split('[')[-1].rstrip(']')} {r['time_vs_plain']:.2f}x"
                     for r in rows if ' trar [' in r['name'] and 'time_vs_plain' in r)


def fastest_eager(check: Check) -> str | None:
    """The implementation with the smallest mean TRAR / plain eager step time over the configurations where every
    configuration measured it (None before the steps section has such rows)."""
    rows = check.rows_named('steps')
    means = {}
    for name in implementations():
        ratios = [rows.get(f"{config_tag(*config)} eager trar [{name}]", {}).get('time_vs_plain')
                  for config in check.shapes.steps]
        if all(ratio is not None for ratio in ratios):
            means[name] = sum(ratios) / len(ratios)
    return min(means, key=means.get) if means else None


def eager_implementation(check: Check) -> str:
    """The fastest measured implementation that runs without torch.compile (flex compiles itself), else triton on
    CUDA when installed, else dense: what train.py's eager runs use."""
    rows = check.rows_named('steps')
    candidates = [n for n in implementations() if n != 'flex' and (check.cuda or n not in GPU_ONLY)]
    ratios = {n: rows.get(f"{config_tag(*check.shapes.steps[0])} eager trar [{n}]", {}).get('time_vs_plain')
              for n in candidates}
    measured = {n: r for n, r in ratios.items() if r is not None}
    if measured:
        return min(measured, key=measured.get)
    return 'triton' if check.cuda and importlib.util.find_spec('triton') else 'dense'


def flash_attention():
    """SDPA restricted to its flash backend (the baseline the targets name); any backend on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if torch.cuda.is_available() else contextlib.nullcontext()


def section_attention(check: Check) -> str:
    """Attention alone, one layer fwd+bwd, at every configuration: flash SDPA (the reference), routed attention per
    implementation, the stacked maps."""
    summary = []
    for img_size, batch, orders in check.shapes.steps:
        args = bench_args(check, img_size, batch, orders)
        steps = bench.attention_steps(args, check.device, layers=1)
        tag = config_tag(img_size, batch, orders)
        flash = check.row(f'{tag} flash SDPA',
                          lambda: time_and_memory(check, under(None, steps['plain attention'], flash_attention), args),
                          cost=3)
        routed = {}
        for impl in implementations() or ('default',):
            def measure(impl=impl):
                if impl in GPU_ONLY:
                    check.need_cuda('its backward needs CUDA')
                step = under(None if impl == 'default' else impl, steps['routed_attention'])
                values = time_and_memory(check, step, args)
                if 'ms' in flash:
                    values['vs_flash'] = values['ms'] / flash['ms']
                return values
            routed[impl] = check.row(f'{tag} routed [{impl}]', measure, cost=3)
        stacked = check.row(f'{tag} stacked (original)',
                            lambda: time_and_memory(check, steps['stacked (original)'], args), cost=3)
        for row in routed.values():
            if 'ms' in row and 'ms' in stacked:
                row['speedup_vs_stacked'] = stacked['ms'] / row['ms']
                if 'alloc_mib' in row and 'alloc_mib' in stacked:
                    row['memory_vs_stacked'] = stacked['alloc_mib'] / row['alloc_mib']
        summary += [f"{img_size}px {impl} {row['vs_flash']:.2f}x" for impl, row in routed.items() if 'vs_flash' in row]
        del steps
    failed_rows(check)
    return 'routed / flash SDPA, fwd+bwd: ' + (', '.join(summary) or 'none measured')


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


# Tuning -----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def flex_block_size(size: int):
    """flex attention's BlockMask block size inside the block (its plans are cached per size)."""
    previous, flex.BLOCK_SIZE = flex.BLOCK_SIZE, size
    try:
        yield
    finally:
        flex.BLOCK_SIZE = previous


@contextlib.contextmanager
def triton_launch(config: dict | None):
    """The Triton kernels launched with `config` (block_m, block_n, num_warps, num_stages) inside the block."""
    from model.attention import triton_kernel
    previous, triton_kernel.LAUNCH_OVERRIDE = triton_kernel.LAUNCH_OVERRIDE, config
    try:
        yield
    finally:
        triton_kernel.LAUNCH_OVERRIDE = previous


def sweep(check: Check, label: str, implementation: str, settings: list[tuple[str, Callable]], args,
          forward_only: bool = False, cost: float = 4) -> dict | None:
    """Routed attention alone (fwd+bwd, or forward only) of `implementation` under each of `settings` ((name,
    context factory)): its time and its largest error against the dense implementation's output; the fastest
    setting whose error is within twice the best error plus one bf16 rounding (a wrong configuration is never
    picked). Returns the picked row, or None."""
    inputs = bench.attention_inputs(args, check.device)
    steps = bench.attention_steps(args, check.device, 1, inputs)
    reference = routed_output(inputs, 'dense')
    rows = []
    for name, context in settings:
        def measure(context=context):
            if not check.cuda and not runs_on_cpu(implementation, forward_only):
                check.need_cuda('its backward needs CUDA')
            with context():
                error = (routed_output(inputs, implementation) - reference).abs().max().item()
                step = steps['routed_attention']
                if forward_only:
                    step = functools.partial(forward_only_step, inputs)
                values = time_and_memory(check, under(implementation, step), args)
            return {**values, 'max_error_vs_dense': error, **({'forward_only': True} if forward_only else {})}
        rows.append(check.row(f'{label} {name}', measure, cost=cost))
    measured = [r for r in rows if 'ms' in r]
    if not measured:
        return None
    tolerance = 2 * min(r['max_error_vs_dense'] for r in measured) + 2 ** -8 * reference.abs().max().item()
    good = [r for r in measured if r['max_error_vs_dense'] <= tolerance]
    best = min(good, key=lambda r: r['ms']) if good else None
    if best is not None:
        best['picked'] = True
    return best


def runs_on_cpu(implementation: str, forward_only: bool) -> bool:
    """Whether `implementation` runs on CPU tensors: flex forward only, Triton under its interpreter
    (TRITON_INTERPRET=1 set before Triton was imported)."""
    if implementation == 'flex':
        return forward_only
    if implementation == 'triton':
        from model.attention import triton_kernel
        return triton_kernel.INTERPRETED
    return True


def routed_output(inputs, implementation: str) -> torch.Tensor:
    """The forward output of routed attention on bench.attention_inputs under `implementation`, in float32."""
    with forced(implementation):
        return inputs.routed_output().float()


def forward_only_step(inputs) -> None:
    inputs.routed_output()


def flex_settings() -> list[tuple[str, Callable]]:
    return [(f'block {size}', functools.partial(flex_block_size, size)) for size in FLEX_BLOCK_SIZES]


def triton_settings() -> list[tuple[str, Callable]]:
    from model.attention import triton_kernel
    return [(launch_name(config), functools.partial(triton_launch, config))
            for config in triton_kernel.CUDA_LAUNCH_CANDIDATES]


def launch_name(config: dict) -> str:
    return 'm{block_m} n{block_n} w{num_warps} s{num_stages}'.format(**config)


FLEX_BLOCK_SIZES = (128, 64)


def section_tune(check: Check) -> str:
    """Sweep flex's block sizes and the Triton kernels' launch configurations at every configuration; keep the
    fastest for the rest of the run and print them ready to paste."""
    picks = []
    for img_size, batch, orders in check.shapes.steps:
        args = bench_args(check, img_size, batch, orders)
        tag = config_tag(img_size, batch, orders)
        best = sweep(check, f'{tag} flex', 'flex', flex_settings(), args, forward_only=not check.cuda)
        if best is not None:
            size = int(best['name'].rsplit(' ', 1)[1])
            check.tuned.setdefault('flex BLOCK_SIZE', {})[tag] = size
            picks.append(f"{img_size}px flex block {size} ({best['ms']:.2f} ms)")
        if 'triton' in implementations() and check.cuda:
            from model.attention import triton_kernel
            best = sweep(check, f'{tag} triton', 'triton', triton_settings(), args)
            if best is not None:
                config = next(c for c in triton_kernel.CUDA_LAUNCH_CANDIDATES if launch_name(c) in best['name'])
                pad = triton_kernel.plan_orders(args_grid(args), tuple(map(int, orders.split(','))),
                                                check.device).local_pad
                triton_kernel.CUDA_LAUNCH[pad] = dict(config)  # kept for the rest of this run
                check.tuned.setdefault('triton CUDA_LAUNCH', {})[pad] = dict(config)
                picks.append(f"{img_size}px triton {launch_name(config)} ({best['ms']:.2f} ms)")
    sizes = set(check.tuned.get('flex BLOCK_SIZE', {}).values())
    if len(sizes) == 1:
        flex.BLOCK_SIZE = sizes.pop()  # kept for the rest of this run
    refused = [r['name'] for r in check.section.rows if 'error' in r]  # a configuration that does not fit the chip
    if refused:
        picks.append(f"{len(refused)} configurations failed: {', '.join(refused)}")
    if not picks:
        raise RuntimeError('no setting measured')
    if not check.cuda:
        picks.append('Triton sweep needs CUDA (tests/scripts/test_gpu_check.py runs it under TRITON_INTERPRET)')
    return '; '.join(picks)


def args_grid(args: argparse.Namespace) -> tuple[int, int]:
    patch = bench.model_config(args).patches.size[0]
    return args.img_size // patch, args.img_size // patch


def section_compiled(check: Check) -> str:
    """Compiled plain, TRAR with the fastest eager implementation only, and timm."""
    check.need_cuda('Inductor on the CPU takes minutes')
    name = fastest_eager(check) or default_implementation(check.device)
    for variants in ((('plain', None), ('trar', name)), (('timm', None),)):  # each about 60 s: the ratios first
        for img_size, batch, orders in check.shapes.steps:
            args = bench_args(check, img_size, batch, orders, compile=True)
            for variant, impl in variants:
                label = trar_label(check, impl) if variant == 'trar' else variant
                check.row(f'{config_tag(img_size, batch, orders)} compiled {label}',
                          step_measure(check, args, variant, impl), cost=60)
    failed_rows(check)
    return f"TRAR [{name}] / plain compiled: {ratio_summary(check.section.rows) or 'none measured'}"


def section_mfu(check: Check) -> str:
    check.need_cuda()
    rate = bench.matmul_rate(check.device)
    check.section.rows.append({'name': 'bf16 matmul 8192^3', 'tflops': rate / 1e12})
    check.line(f"  mfu | measured bf16 matmul rate {rate / 1e12:.0f} TFLOP/s")
    results = []
    for img_size, batch, orders in check.shapes.steps:
        args = bench_args(check, img_size, batch, orders)
        for mode, section in (('compiled', 'compiled'), ('eager', 'steps')):
            plain = check.rows_named(section).get(f"{config_tag(img_size, batch, orders)} {mode} plain", {})
            if 'ms' in plain:
                achieved = 3 * bench.forward_flops(args) * batch / (plain['ms'] / 1e3)
                row = check.row(f"{img_size}px b{batch} plain {mode}",
                                lambda: {'model_tflops': achieved / 1e12, 'mfu': achieved / rate})
                results.append(f"{img_size}px {mode} {row['mfu']:.0%}")
    if not results:
        raise Skip('no plain ViT-B/16 step time measured')
    return 'plain ViT-B/16 MFU: ' + ', '.join(results)



def train_command(check: Check, name: str, *flags: str, launcher: tuple[str, ...] = ()) -> list[str]:
    steps = check.shapes.train_steps
    return [*(launcher or (sys.executable,)), 'train.py', '--name', name, '--dataset', 'digits',
            '--model_type', 'testing', '--img_size', '32', '--pretrained_dir', 'none', '--output_dir', str(check.work),
            '--train_batch_size', '16' if check.dry else '64', '--eval_batch_size', '360', '--num_steps', str(steps),
            '--eval_every', str(steps), '--warmup_steps', str(min(10, steps - 1)), '--learning_rate', '0.1',
            '--num_workers', '2', '--device', check.device.type, *flags]


def train_row(check: Check, name: str, *flags: str, launcher: tuple[str, ...] = (), cost: float = 10) -> dict:
    """One train.py run: compiled with the device's default implementation, else with `eager_implementation`."""
    def measure():
        if '--compile' in flags and not check.cuda:
            raise Skip('no CUDA: Inductor on the CPU takes minutes')
        implementation = None if '--compile' in flags else eager_implementation(check)
        started = time.monotonic()
        code, lines = check.run_subprocess(train_command(check, name, *flags, launcher=launcher),
                                           env={'TRAR_ATTENTION': implementation or ''})
        if code is None:
            raise Cut(f'cut at {time.monotonic() - started:.0f} s')
        if code != 0:
            raise RuntimeError(f"exit status {code}: {(lines or ['no output'])[-1]}")
        results = json.loads(next(line for line in reversed(lines) if line.startswith('{')))  # train.py's summary
        return {'attention': implementation or f'{default_implementation(check.device)} (compiled)',
                **{key: results[key] for key in ('best_acc', 'steps', 'seconds', 'peak_memory_mib', 'world_size')}}
    return check.row(name, measure, cost)


def section_train(check: Check) -> str:
    runs = (('bf16_compile', '--fp16', '--amp_dtype', 'bf16', '--compile'), ('bf16', '--fp16', '--amp_dtype', 'bf16'),
            ('fp16_O1', '--fp16', '--fp16_opt_level', 'O1'), ('fp16_O2', '--fp16', '--fp16_opt_level', 'O2'))
    if check.dry:  # one run checks the path (in float32: CPU autocast is slow); the others differ only on a GPU
        runs = [('fp32',)]
    rows = [train_row(check, name, *flags, cost=40 if '--compile' in flags else 8) for name, *flags in runs]
    failed_rows(check)
    return ', '.join(f"{r['name']} acc {r['best_acc']:.2f}" for r in rows if 'best_acc' in r)


def section_ddp(check: Check) -> str:
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1')
    precision = () if check.dry else ('--fp16', '--amp_dtype', 'bf16')  # CPU autocast is slow
    row = train_row(check, 'torchrun_1_process', *precision, launcher=launcher)
    if 'error' in row:
        raise RuntimeError(f"torchrun: {row['error']}")
    backend = 'NCCL' if check.cuda else 'gloo (CPU stand-in)'
    return f"{backend}, world size {row.get('world_size')}, acc {row.get('best_acc', float('nan')):.2f}"


def section_loader(check: Check) -> str:
    """benchmarks/loader.py's table: float32 and uint8 pipelines per worker count, shards, GPU decoding as a row."""
    import loader
    shapes = check.shapes
    args = loader.get_args(['--images', str(min(shapes.loader_images, 256)), '--img_size', '224' if check.cuda
                            else str(shapes.loader_img_size), '--num_workers', ','.join(map(str, shapes.workers)),
                            '--rounds', '1', '--batch_size', '32' if check.cuda else '4',
                            '--device', check.device.type])
    rows = [check.row(f"{r['pipeline']} {r['dtype']} {r['workers']} workers", lambda r=r: r)
            for r in loader.loader_table(args)]
    return ', '.join(f"{r['name']} {r['images_s']:.0f} img/s" for r in rows if r['dtype'] == 'uint8')


# The sections, most valuable first, with their budgets in seconds on one H100 (the estimates BENCHMARKS.md states).
# A new section is a function of the Check returning its headline, added here at its place in the priorities.
SECTIONS = [
    Section('tests', 100, section_tests),
    Section('steps', 80, section_steps),
    Section('attention', 25, section_attention),
    Section('sync', 15, section_sync),
    Section('tune', 60, section_tune),
    Section('compiled', 120, section_compiled),
    Section('mfu', 5, section_mfu),
    Section('train', 50, section_train),
    Section('ddp', 15, section_ddp),
    Section('loader', 45, section_loader),
]


# Report ----------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        lines.append('| ' + ' | '.join(format_value(row.get(c, '')).replace('|', '/') for c in columns) + ' |')
    return lines


def targets(check: Check) -> list[dict]:
    """The issue's GPU targets next to what this run measured (best TRAR row per configuration)."""
    found = []
    for section in ('steps', 'compiled'):
        rows = check.rows_named(section)
        for img_size, batch, orders in check.shapes.steps:
            tag = config_tag(img_size, batch, orders)
            trar_rows = [r for n, r in rows.items() if n.startswith(tag) and ' trar [' in n and 'time_vs_plain' in r]
            if trar_rows:
                best = min(trar_rows, key=lambda r: r['time_vs_plain'])
                found.append({'measure': f'TRAR / plain step time, {tag} ({best["name"].split(" ", 3)[-1]})',
                              'target': '<= 1.10x', 'measured': f"{best['time_vs_plain']:.2f}x",
                              'met': best['time_vs_plain'] <= 1.10})
                if 'alloc_vs_plain' in best:
                    found.append({'measure': f'TRAR / plain peak memory, {tag}', 'target': '<= 1.10x',
                                  'measured': f"{best['alloc_vs_plain']:.2f}x", 'met': best['alloc_vs_plain'] <= 1.10})
            mode = 'compiled' if section == 'compiled' else 'eager'
            plain, timm_row = (rows.get(f"{tag} {mode} {v}", {}) for v in ('plain', 'timm'))
            if 'ms' in plain and 'ms' in timm_row:
                ratio = plain['ms'] / timm_row['ms']
                found.append({'measure': f'plain / timm step time, {img_size} px, {mode}', 'target': '<= 1.00x',
                              'measured': f'{ratio:.2f}x', 'met': ratio <= 1.0})
    attention = check.rows_named('attention')
    for (img_size, batch, orders), limit in zip(check.shapes.steps, (1.5, 1.7)):
        tag = config_tag(img_size, batch, orders)
        routed = [r for n, r in attention.items() if n.startswith(f'{tag} routed') and 'vs_flash' in r]
        if routed:
            best = min(routed, key=lambda r: r['vs_flash'])
            found.append({'measure': f"routed attention / flash SDPA, fwd+bwd, {tag} ({best['name'].split(' ')[-1]})",
                          'target': f'<= {limit}x', 'measured': f"{best['vs_flash']:.2f}x",
                          'met': best['vs_flash'] <= limit})
        against = [r for n, r in attention.items() if n.startswith(f'{tag} routed') and 'speedup_vs_stacked' in r]
        if against:
            best = max(against, key=lambda r: r['speedup_vs_stacked'])
            memory, which = best.get('memory_vs_stacked'), best['name'].split(' ')[-1]
            found.append({'measure': f"routed attention vs stacked maps, fwd+bwd, {tag} ({which})",
                          'target': '>= 3x faster, >= 5x less memory',
                          'measured': f"{best['speedup_vs_stacked']:.2f}x faster"
                                      + (f", {memory:.1f}x less memory" if memory else ''),
                          'met': best['speedup_vs_stacked'] >= 3 and (memory or 0) >= 5})
    for row in check.rows_named('mfu').values():
        if 'mfu' in row:
            found.append({'measure': f"plain ViT-B/16 MFU, {row['name']}", 'target': '>= 45%',
                          'measured': f"{row['mfu']:.0%}", 'met': row['mfu'] >= 0.45})
    return found


def settings_to_paste(check: Check) -> list[str]:
    """What this run's figures say to set: CUDA_DEFAULT and the tuned knobs, as lines of Python."""
    lines = []
    fastest = fastest_eager(check)
    if fastest and check.cuda:
        lines.append(f"model/attention/settings.py: CUDA_DEFAULT = {fastest!r}  # fastest eager TRAR / plain step")
    sizes = check.tuned.get('flex BLOCK_SIZE', {})
    if sizes:
        lines.append(f"model/attention/flex.py: BLOCK_SIZE = {max(set(sizes.values()), key=list(sizes.values()).count)}"
                     f"  # per configuration: {sizes}")
    launch = check.tuned.get('triton CUDA_LAUNCH')
    if launch:
        lines.append(f"model/attention/triton_kernel.py: CUDA_LAUNCH.update({launch})")
    return lines


def write_tables(check: Check, header: dict) -> list[dict]:
    """gpu_check.json and gpu_check.md with every row so far (rewritten after each section); the targets."""
    try:
        goals = targets(check)
    except Exception as error:  # noqa: BLE001: the rows matter more than the summary of them
        goals = [{'measure': 'targets', 'target': '', 'measured': one_line(error), 'met': False}]
    settings = settings_to_paste(check)
    document = {**header, 'seconds': check.elapsed(), 'targets': goals, 'settings': settings,
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
    if settings:
        md += ['## settings from these figures', '', '```', *settings, '```', '']
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
            met = 'yes' if goal['met'] else 'no'
            check.line(f"| {goal['measure']} | {goal['target']} | {goal['measured']} | {met} |")
    for setting in settings_to_paste(check):
        check.line(setting)
    check.line(f"\nwrote {check.out / 'gpu_check.md'}, gpu_check.json and gpu_check.log")


def start_watchdog(check: Check, header: dict, seconds: float) -> threading.Timer:
    """After `seconds`, whatever the main thread is doing (a hang included): log its stack, mark the running section
    cut, kill its subprocess, write the tables and the summary, and end the process."""
    def fire():
        with check.lock:
            check.line(f"\nwatchdog: the run passed {seconds:.0f} s; the main thread's stack is in gpu_check.log")
            faulthandler.dump_traceback(file=check.log, all_threads=True)
            check.kill_subprocess()
            section = check.section
            if section is not None and section.status == 'running':
                section.seconds = time.monotonic() - check.section_started
                section.status = f'cut at {section.seconds:.0f} s by the watchdog'
            print_summary(check, write_tables(check, header))
            check.log.flush()
            os._exit(0)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Path]:
    """The arguments, checked before anything runs: one line each for a bad budget, section list or output place."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry', action='store_true', help='tiny shapes on the CPU: checks that every section runs')
    p.add_argument('--budget', type=float, default=None,
                   help=f'seconds for all sections (default {DEFAULT_BUDGET[False]:.0f} on a GPU, '
                        f'{DEFAULT_BUDGET[True]:.0f} in --dry); a watchdog ends the run {WATCHDOG_GRACE:.0f} s later')
    p.add_argument('--out', default=None, help='output folder (default $OUT, else output/gpu_check)')
    p.add_argument('--sections', default=','.join(s.name for s in SECTIONS), help='comma-separated, in order')
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = DEFAULT_BUDGET[args.dry]
    elif not math.isfinite(args.budget) or args.budget <= 0:
        p.error(f"--budget {args.budget:g}: expected a positive number of seconds")
    wanted = [name for name in args.sections.split(',') if name]
    unknown = [name for name in wanted if name not in {s.name for s in SECTIONS}]
    if unknown or not wanted:
        p.error(f"--sections {args.sections!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none named'}; "
                f"expected some of {', '.join(s.name for s in SECTIONS)}")
    args.sections = wanted
    out = Path(args.out or os.environ.get('OUT') or ROOT / 'output' / 'gpu_check')
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: is a file; expected a folder (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / 'gpu_check.log'
        with open(probe, 'a'):
            pass
    except OSError as error:
        p.error(f"--out {out}: cannot write there ({error.strerror or error}); expected a writable folder")
    return args, out


def main(argv: list[str] | None = None) -> None:
    args, out = parse_args(argv)
    if args.dry:  # the CPU kernel of shared_scores has its own tests; building it (about 40 s) checks nothing here
        os.environ.setdefault('TRAR_CPU_KERNEL', '0')
    global SETUP
    SETUP = ensure_ml_collections()  # before anything imports the project (its config needs ml_collections)
    import_project()
    check = Check(args, out, open(out / 'gpu_check.log', 'w'))
    for name in ('recompile_limit', 'cache_size_limit'):  # many models share one forward: keep their graphs
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    header = {'device': torch.cuda.get_device_name() if check.cuda else f'CPU ({os.cpu_count()} cores)',
              'torch': torch.__version__, 'python': platform.python_version(), 'dry': check.dry,
              'budget': args.budget, 'implementations': ', '.join(implementations()) or 'not found',
              'default_implementation': default_implementation(check.device), 'setup': SETUP}
    check.line('# gpu_check: ' + ', '.join(f'{k} {v}' for k, v in header.items()))
    watchdog = start_watchdog(check, header, args.budget + WATCHDOG_GRACE)
    planned, goals = 0.0, []
    total = sum(s.budget for s in SECTIONS if s.name in args.sections)
    for section in SECTIONS:
        if section.name not in args.sections:
            section.status = 'skipped: not asked for'
            continue
        share = section.budget * args.budget / total
        planned += share  # time one section leaves is the next one's
        now = time.monotonic()
        with check.lock:
            check.section, check.section_end = section, min(check.end, max(check.start + planned, now + share / 2))
            section.status, check.section_started = 'running', now
        check.line(f"\n== {section.name} (until +{check.section_end - check.start:.0f} s)")
        try:
            if check.time_left() <= 0:
                raise Skip('time budget')
            headline = section.run(check)
            cut = [row['cut'] for row in section.rows if 'cut' in row]
            status = f'cut at {time.monotonic() - now:.0f} s ({len(cut)} rows cut)' if cut else 'ok'
        except Skip as reason:
            headline, status = '', f'skipped: {reason}'
        except Cut as reason:
            headline, status = str(reason).partition(': ')[2], str(reason).partition(': ')[0]
        except Exception as error:  # noqa: BLE001: a failed section is recorded, the next one runs
            headline, status = one_line(error), 'failed'
            check.log.write(traceback.format_exc())
        finally:
            free_memory()
        with check.lock:
            section.headline, section.status = headline, status
            section.seconds = time.monotonic() - now
            goals = write_tables(check, header)
            check.line(f"== {section.name}: {section.status} in {section.seconds:.0f} s: {section.headline}")
    watchdog.cancel()
    with check.lock:
        print_summary(check, goals)


SETUP = ''

if __name__ == '__main__':
    sys.stdout.reconfigure(line_buffering=True)
    sys.path.insert(0, str(ROOT))  # utils.errors needs only the standard library
    from utils.errors import command_line
    command_line(main, 'gpu_check.py')
