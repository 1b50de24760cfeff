"""Validation accuracy against training step, per model over several seeds, with the statistics that go with it.

    python scripts/plot_curves.py --model "TRAR-ViT" output/demo_trar_seed{1..5} \
        --model "plain ViT" output/demo_plain_seed{1..5} --out docs/convergence.png --summary output/compare/summary

Reads the accuracy scalars that train.py writes to TensorBoard under each run's folder. Per model it draws
the mean curve over its runs with a band from the lowest to the highest run at every step (one run: its
curve), and reports steps to `--threshold`, best and final accuracy as mean ± sample sd over the runs.
With two models of as many runs, the runs are paired in the order given (the same seed, when the
checkpoints record seeds: a mismatch is an error) and the per-seed differences (first model − second)
are reported too. `--summary PATH` writes PATH.json and a markdown table to PATH.md. Every argument and output place is
checked before the logs are read (utils/outputs.py's rule); an error is one line naming this script.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse
import json
import statistics

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from utils import outputs, tool  # noqa: E402
from utils.errors import command_line, message  # noqa: E402
from utils.checkpoint import read as read_checkpoint  # noqa: E402

TOOL = 'plot_curves.py'
METRICS = ('steps_to_threshold', 'best_acc', 'final_acc', 'seconds')


def read_scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar train.py logged under `run_dir`: tag -> (steps, values), sorted by step."""
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist or is not a folder: expected a train.py run folder")
    if not any(run_dir.rglob('events.out.tfevents.*')):
        raise ValueError(f"no TensorBoard event files under {run_dir}: expected a train.py run folder")
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()['scalars']:
        pairs = sorted((event.step, event.value) for event in events.Scalars(tag))
        scalars[tag] = ([step for step, _ in pairs], [value for _, value in pairs])
    return scalars


def read_curve(run_dir: Path, tag: str | None = None) -> tuple[str, list[int], list[float]]:
    """(tag, steps, values) of one run; without `tag`, the only scalar tag naming an accuracy."""
    scalars = read_scalars(run_dir)
    if tag is None:
        candidates = [t for t in scalars if 'acc' in t.lower()]
        if len(candidates) != 1:
            raise ValueError(f"pick one of {sorted(scalars)} with --tag (found {candidates})")
        tag = candidates[0]
    elif tag not in scalars:
        raise ValueError(f"{run_dir} has no scalar {tag!r}; it has {sorted(scalars)}")
    return (tag, *scalars[tag])


def first_step_reaching(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first evaluated step whose value is at least `threshold`, or None."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def run_seed(run_dir: Path) -> int | None:
    """The seed a run was trained with, from its last checkpoint's arguments (None without one)."""
    checkpoint = run_dir / 'last.ckpt'
    if not checkpoint.exists():
        return None
    args = read_checkpoint(checkpoint).get('args')  # a truncated file: one line naming it
    seed = args.get('seed') if isinstance(args, dict) else None
    return seed if isinstance(seed, int) else None


def run_seconds(run_dir: Path) -> float | None:
    """The training seconds a run's results.json records (None without the file)."""
    results = run_dir / 'results.json'
    if not results.exists():
        return None
    try:
        seconds = json.loads(results.read_text()).get('seconds')
    except (ValueError, OSError, AttributeError) as error:
        raise ValueError(f"{results} is not the JSON object train.py writes: {message(error)}") from None
    return seconds if isinstance(seconds, (int, float)) else None


def run_record(run_dir: Path, tag: str | None, threshold: float) -> dict:
    """One run's curve and figures: steps to threshold (None if never), best and final value, training seconds."""
    tag, steps, values = read_curve(run_dir, tag)
    return {'run': str(run_dir), 'seed': run_seed(run_dir), 'tag': tag, 'steps': steps, 'values': values,
            'steps_to_threshold': first_step_reaching(steps, values, threshold),
            'best_acc': max(values), 'final_acc': values[-1], 'seconds': run_seconds(run_dir)}


def describe(values: list[float | None]) -> dict:
    """Mean and sample sd of the values that exist (a run that never reached the threshold has None)."""
    present = [v for v in values if v is not None]
    return {'mean': statistics.fmean(present) if present else None,
            'sd': statistics.stdev(present) if len(present) > 1 else None,
            'n': len(present), 'of': len(values), 'values': values}


def model_summary(label: str, runs: list[dict]) -> dict:
    return {'label': label, 'runs': [{k: r[k] for k in ('run', 'seed', *METRICS)} for r in runs],
            **{metric: describe([r[metric] for r in runs]) for metric in METRICS}}


def paired_difference(first: list[dict], second: list[dict]) -> dict:
    """Per pair of runs (same position, same seed), first − second for every metric both runs have."""
    for a, b in zip(first, second):
        if a['seed'] is not None and b['seed'] is not None and a['seed'] != b['seed']:
            raise ValueError(f"{a['run']} (seed {a['seed']}) is paired with {b['run']} "
                             f"(seed {b['seed']}); give both models' runs in the same seed order")
    return {'seeds': [a['seed'] for a in first],
            **{metric: describe([None if a[metric] is None or b[metric] is None else a[metric] - b[metric]
                                 for a, b in zip(first, second)]) for metric in METRICS}}


def summarize(models: list[tuple[str, list[dict]]], threshold: float) -> dict:
    summary = {'threshold': threshold, 'band': 'min-max over runs',
               'models': [model_summary(label, runs) for label, runs in models]}
    if len(models) == 2 and len(models[0][1]) == len(models[1][1]) > 1:
        summary['paired_difference'] = {'label': f"{models[0][0]} − {models[1][0]}",
                                        **paired_difference(models[0][1], models[1][1])}
    return summary


def mean_sd(stats: dict, scale: float = 1.0, unit: str = '', digits: int = 0) -> str:
    """'500 ± 35' (or '500' for one value, 'never' for none), with the count when some are missing."""
    if stats['mean'] is None:
        return 'never'
    text = f"{stats['mean'] * scale:.{digits}f}{unit}"
    if stats['sd'] is not None:
        text += f" ± {stats['sd'] * scale:.{digits}f}{unit}"
    if stats['n'] < stats['of']:
        text += f" ({stats['n']} of {stats['of']} runs)"
    return text


def each(stats: dict, scale: float = 1.0, digits: int = 0) -> str:
    return ', '.join('never' if v is None else f"{v * scale:.{digits}f}" for v in stats['values'])


def markdown(summary: dict) -> str:
    """The summary as a markdown table: per model and for the paired difference, the per-run values and mean ± sd."""
    threshold = f"{summary['threshold']:.0%}"
    rows = [*summary['models']]
    if 'paired_difference' in summary:
        rows.append(summary['paired_difference'])
    runs = summary['models'][0]['runs']
    seeds = f" (seeds {', '.join(str(r['seed']) for r in runs)})" if all(r['seed'] is not None for r in runs) else ''
    lines = [f"Validation accuracy over {len(runs)} runs{seeds}; mean ± sample sd"
             + ("; the difference pairs the runs of the same seed." if 'paired_difference' in summary else '.'), '',
             f"| | steps to {threshold}, each | steps to {threshold} | best accuracy | final accuracy "
             "| training seconds |",
             '|---|---|---|---|---|---|']
    for row in rows:
        lines.append(f"| {row['label']} | {each(row['steps_to_threshold'])} | {mean_sd(row['steps_to_threshold'])} | "
                     f"{mean_sd(row['best_acc'], 100, '%', 1)} | {mean_sd(row['final_acc'], 100, '%', 1)} | "
                     f"{mean_sd(row['seconds'])} |")
    return '\n'.join(lines) + '\n'


def plot(models: list[tuple[str, list[dict]]], threshold: float, title: str) -> plt.Figure:
    """Per model the mean curve over its runs and the min-max band; under the threshold line, the mean step ± sd."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, (label, runs) in enumerate(models):
        steps = runs[0]['steps']
        for run in runs[1:]:
            if run['steps'] != steps:
                raise ValueError(f"{run['run']} was evaluated at other steps than "
                                 f"{runs[0]['run']}; the runs of one model must share their evaluation steps")
        values = np.array([run['values'] for run in runs])
        reached = describe([run['steps_to_threshold'] for run in runs])
        best = describe([run['best_acc'] for run in runs])
        reach = f"{threshold:.0%} at step {mean_sd(reached)}" if reached['n'] else f"never {threshold:.0%}"
        text = (f"{label}: {reach}, best {mean_sd(best, 100, '%', 1)}"
                + (f" ({len(runs)} runs)" if len(runs) > 1 else ''))
        line, = ax.plot(steps, values.mean(0), marker='o', markersize=2.5, linewidth=1.5, label=text)
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        if reached['mean'] is not None:
            ax.errorbar(reached['mean'], threshold - 0.03 * (index + 1), xerr=reached['sd'] or 0,
                        color=line.get_color(), marker='|', markersize=12, capsize=4, linewidth=1.5)
    ax.axhline(threshold, color='grey', linestyle='--', linewidth=1)
    ax.set_xlabel('training step')
    ax.set_ylabel('validation accuracy')
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=9)
    several = any(len(runs) > 1 for _, runs in models)
    ax.set_title(title + ('\nmean of the runs, band from the lowest to the highest run; '
                          f'bars: mean step to {threshold:.0%} ± sd' if several else ''), fontsize=10)
    fig.tight_layout()
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', nargs='+', action='append', required=True, metavar=('LABEL', 'RUN'),
                        help="a legend name and that model's run folders (TensorBoard logs inside); repeat per model")
    parser.add_argument('--tag', default=None, help="scalar to plot (default: the one with 'acc' in its name)")
    parser.add_argument('--threshold', type=float, default=0.9, help='accuracy whose first step is reported')
    parser.add_argument('--title', default='Validation accuracy on digits')
    parser.add_argument('--out', type=Path, default=Path('docs/convergence.png'))
    parser.add_argument('--summary', type=Path, default=None,
                        help='write the statistics to SUMMARY.json and SUMMARY.md')
    args = parser.parse_args(argv)
    for model in args.model:
        if len(model) < 2:
            parser.error(f"--model {model[0]!r} names no run folder: expected --model LABEL RUN [RUN ...]")
        for run in model[1:]:
            if not Path(run).is_dir():
                parser.error(f"--model {model[0]!r}: run folder {run} does not exist or is not a folder")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold {args.threshold}: expected an accuracy between 0 and 1")
    return args


def summary_paths(summary: Path | None) -> dict[str, Path]:
    """SUMMARY.json and SUMMARY.md, or nothing."""
    return {} if summary is None else {suffix: summary.with_name(summary.name + suffix) for suffix in ('.json', '.md')}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    outputs.check_figure(args.out, '--out')  # before the logs are read: a bad place fails first
    tables = summary_paths(args.summary)
    for suffix, path in tables.items():
        outputs.check_output(path, '--summary', (suffix,))
    models = [(label, [run_record(Path(run), args.tag, args.threshold) for run in runs])
              for label, *runs in args.model]
    summary = summarize(models, args.threshold)
    print(markdown(summary), end='')
    fig = plot(models, args.threshold, args.title)
    try:
        outputs.save_figure(fig, args.out, TOOL, dpi=120)
    finally:
        plt.close(fig)
    print(f"wrote {args.out}")
    for suffix, path in tables.items():
        outputs.write_text(path, outputs.json_text(summary, TOOL) if suffix == '.json'
                           else markdown(summary) + f"\n<!-- {outputs.mark(TOOL)} -->\n")
        print(f"wrote {path}")
    return summary


if __name__ == '__main__':
    command_line(main, TOOL, expected=tool.EXPECTED)
