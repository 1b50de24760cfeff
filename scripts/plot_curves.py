"""Validation accuracy against training step for several runs, in one picture.

    python scripts/plot_curves.py output/demo output/demo_plain --labels "TRAR-ViT" "plain ViT" \
        --out docs/convergence.png

Reads the accuracy scalars that train.py writes to TensorBoard under each run's folder, marks where
each run first reaches `--threshold`, and prints one line per run with the numbers in the legend.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_curve(run_dir: Path, tag: str | None) -> tuple[str, list[int], list[float]]:
    """(tag, steps, values) of one run; without `tag`, the only scalar tag naming an accuracy."""
    if not any(run_dir.rglob('events.out.tfevents.*')):
        raise SystemExit(f"plot_curves.py: error: no TensorBoard event files under {run_dir}")
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    events.Reload()
    tags = events.Tags()['scalars']
    if tag is None:
        candidates = [t for t in tags if 'acc' in t.lower()]
        if len(candidates) != 1:
            raise SystemExit(f"plot_curves.py: error: pick one of {tags} with --tag (found {candidates})")
        tag = candidates[0]
    elif tag not in tags:
        raise SystemExit(f"plot_curves.py: error: {run_dir} has no scalar {tag!r}; it has {tags}")
    scalars = sorted((e.step, e.value) for e in events.Scalars(tag))
    return tag, [s for s, _ in scalars], [v for _, v in scalars]


def first_step_reaching(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first evaluated step whose value is at least `threshold`, or None."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def plot(runs: list[tuple[str, list[int], list[float]]], threshold: float, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, steps, values in runs:
        reached = first_step_reaching(steps, values, threshold)
        text = f"{label}: {threshold:.0%} at step {reached}" if reached else f"{label}: never {threshold:.0%}"
        text += f", best {max(values):.1%}"
        line, = ax.plot(steps, values, marker='o', markersize=3, label=text)
        if reached:
            ax.axvline(reached, color=line.get_color(), linestyle=':', linewidth=1)
    ax.axhline(threshold, color='grey', linestyle='--', linewidth=1)
    ax.set_xlabel('training step')
    ax.set_ylabel('validation accuracy')
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    ax.set_title(title)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', type=Path, help="runs' output folders (TensorBoard logs inside)")
    parser.add_argument('--labels', nargs='+', default=None, help='legend names, one per run (default: folder names)')
    parser.add_argument('--tag', default=None, help="scalar to plot (default: the one with 'acc' in its name)")
    parser.add_argument('--threshold', type=float, default=0.9, help='accuracy whose first step is marked')
    parser.add_argument('--title', default='Validation accuracy on digits')
    parser.add_argument('--out', type=Path, default=Path('docs/convergence.png'))
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    runs = []
    for run, label in zip(args.runs, labels):
        tag, steps, values = read_curve(run, args.tag)
        reached = first_step_reaching(steps, values, args.threshold)
        print(f"{label}: {tag} reaches {args.threshold:.0%} at step {reached}, best {max(values):.4f} "
              f"at step {steps[values.index(max(values))]}, last {values[-1]:.4f} at step {steps[-1]}")
        runs.append((label, steps, values))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot(runs, args.threshold, args.title)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
