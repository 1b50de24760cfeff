"""scripts/plot_curves.py, scripts/plot_routing.py and the seed loop of scripts/demo.sh, on a few tiny runs.

The seed comparison itself (ten runs of 1,200 steps) belongs to `bash scripts/demo.sh compare`, not to the
suite: here two seeds of a routed and a plain model train for 20 steps, and every figure the scripts report
is checked against what train.py printed and wrote, or against an independent computation.
"""
import json
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from torch.utils.data import DataLoader, Subset

import train
from train_helpers import ROOT, tiny_args

sys.path.insert(0, str(ROOT / 'scripts'))
import plot_curves  # noqa: E402
import plot_routing  # noqa: E402

SEEDS = (1, 2)
STEPS = 20


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Per model, per seed: (run folder, results.json, the validation accuracies train.py printed by step)."""
    out = tmp_path_factory.mktemp('runs')
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and loses much on a busy machine
    try:
        for model, orders in (('trar', '0,1,2'), ('plain', 'none')):
            for seed in SEEDS:
                name = f'{model}_seed{seed}'
                args = tiny_args(out, name, '--orders', orders, '--seed', str(seed), '--augment', 'none',
                                 '--eval_every', '5', steps=STEPS)
                printed = _run_printing(args)
                runs[model, seed] = (out / name, json.loads((out / name / 'results.json').read_text()), printed)
    finally:
        torch.set_num_threads(threads)
    return runs


def _run_printing(args: list[str]) -> dict[int, float]:
    """Train in this process and return the 'step N: validation accuracy X' lines train.py printed."""
    captured = StringIO()
    with redirect_stdout(captured), redirect_stderr(captured):
        train.main(args)
    return {int(step): float(acc) for step, acc in re.findall(r'step (\d+): validation accuracy ([\d.]+)',
                                                              captured.getvalue())}


def records(runs, model: str, threshold: float) -> list[dict]:
    return [plot_curves.run_record(runs[model, seed][0], None, threshold) for seed in SEEDS]


def test_each_run_reads_as_train_py_printed_and_wrote_it(runs):
    run_dir, results, printed = runs['trar', 1]
    threshold = sorted(printed.values())[len(printed) // 2]  # reached, but not at the first evaluation
    record = plot_curves.run_record(run_dir, None, threshold)
    assert record['tag'] == 'val/accuracy' and record['seed'] == 1
    assert record['steps'] == sorted(printed) == [5, 10, 15, 20]
    np.testing.assert_allclose(record['values'], [printed[s] for s in record['steps']], atol=1e-4)
    assert record['best_acc'] == pytest.approx(results['best_acc']) and record['final_acc'] == pytest.approx(results['final_acc'])
    assert record['steps_to_threshold'] == min(s for s, acc in printed.items() if acc >= threshold - 1e-4)
    assert record['seconds'] == results['seconds']
    assert plot_curves.run_record(run_dir, None, 1.01)['steps_to_threshold'] is None


def test_summary_gives_mean_and_sample_sd_per_model_and_the_paired_differences(runs, tmp_path):
    out = tmp_path / 'curves.png'
    summary = plot_curves.main(['--model', 'TRAR', *(str(runs['trar', s][0]) for s in SEEDS),
                                '--model', 'plain', *(str(runs['plain', s][0]) for s in SEEDS),
                                '--threshold', '0.0', '--out', str(out), '--summary', str(tmp_path / 'summary')])
    for model, row in zip(('trar', 'plain'), summary['models']):
        best = [runs[model, s][1]['best_acc'] for s in SEEDS]
        assert row['best_acc']['mean'] == pytest.approx(np.mean(best))
        assert row['best_acc']['sd'] == pytest.approx(np.std(best, ddof=1), abs=1e-6)
        assert row['steps_to_threshold'] == {'mean': 5, 'sd': 0, 'n': 2, 'of': 2, 'values': [5, 5]}
        assert [r['seed'] for r in row['runs']] == list(SEEDS)
    difference = summary['paired_difference']
    assert difference['label'] == 'TRAR − plain' and difference['seeds'] == list(SEEDS)
    final = [runs['trar', s][1]['final_acc'] - runs['plain', s][1]['final_acc'] for s in SEEDS]
    np.testing.assert_allclose(difference['final_acc']['values'], final, atol=1e-6)
    assert difference['final_acc']['sd'] == pytest.approx(np.std(final, ddof=1), abs=1e-6)
    assert json.loads((tmp_path / 'summary.json').read_text()) == json.loads(json.dumps(summary))
    table = (tmp_path / 'summary.md').read_text()
    assert '(seeds 1, 2)' in table and '| TRAR − plain | 0, 0 | 0 ± 0 |' in table
    assert out.stat().st_size > 10_000


def test_figure_shows_the_mean_curve_and_the_min_max_band(runs):
    models = [('TRAR', records(runs, 'trar', 0.0)), ('plain', records(runs, 'plain', 0.0))]
    fig = plot_curves.plot(models, 0.0, 'digits')
    ax = fig.axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    for (label, model_runs), band in zip(models, bands, strict=True):
        line, = [line for line in ax.lines if line.get_label().startswith(f'{label}: ')]
        values = np.array([r['values'] for r in model_runs])
        np.testing.assert_allclose(line.get_ydata(), values.mean(0))
        outline = band.get_paths()[0].vertices
        for step, low, high in zip(model_runs[0]['steps'], values.min(0), values.max(0)):
            at_step = outline[np.isclose(outline[:, 0], step), 1]
            assert at_step.min() == pytest.approx(low) and at_step.max() == pytest.approx(high)
        assert line.get_label().startswith(f"{label}: 0% at step 5 ± 0, best ")
    assert 'band from the lowest to the highest run' in ax.get_title()


def test_statistics_leave_out_runs_that_never_reached_the_threshold():
    stats = plot_curves.describe([500, None, 600])
    assert stats['mean'] == 550 and stats['sd'] == pytest.approx(2 ** 0.5 * 50) and (stats['n'], stats['of']) == (2, 3)
    assert plot_curves.mean_sd(stats) == '550 ± 71 (2 of 3 runs)'
    assert plot_curves.mean_sd(plot_curves.describe([None])) == 'never'
    assert plot_curves.mean_sd(plot_curves.describe([0.971]), 100, '%', 1) == '97.1%'


def test_runs_of_different_seeds_or_evaluation_steps_are_not_compared(runs, capsys):
    trar, plain = records(runs, 'trar', 0.5), records(runs, 'plain', 0.5)
    with pytest.raises(SystemExit, match=r'seed 1\) is paired with .*seed 2\)'):
        plot_curves.summarize([('TRAR', trar), ('plain', plain[::-1])], 0.5)
    shifted = [dict(plain[0], steps=[s + 1 for s in plain[0]['steps']]), plain[1]]
    with pytest.raises(SystemExit, match='other steps than'):
        plot_curves.plot([('plain', shifted)], 0.5, '')
    with pytest.raises(SystemExit):
        plot_curves.parse_args(['--model', 'TRAR'])
    assert "--model 'TRAR' names no run folder" in capsys.readouterr().err


def test_mean_routing_weights_average_every_image_of_the_validation_set(runs):
    model, checkpoint = plot_routing.load_trained(runs['trar', 1][0] / 'last.ckpt')
    dataset = plot_routing.validation_loader(checkpoint['args'], 32, 64).dataset
    subset = Subset(dataset, range(0, len(dataset), 9))  # 40 images, in batches of 7: a short last batch
    loader = DataLoader(subset, batch_size=7, collate_fn=plot_routing.collate_skipping_none)
    got, accuracy = plot_routing.mean_routing_weights(model, loader)
    per_image, correct = [], 0
    with torch.no_grad():
        for image, label in subset:
            correct += int(model.eval()(image[None]).argmax() == label)
            per_image.append(model.routing_weights()[:, 0].double().numpy())
    expected = np.mean(per_image, axis=0)
    assert accuracy == correct / len(subset)
    assert got.shape == (model.config.transformer.num_layers, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-6)


def test_routing_picture_shows_the_validation_means_and_the_logged_history(runs, tmp_path):
    run_dir = runs['trar', 1][0]
    weights = plot_routing.main([str(run_dir), '--out', str(tmp_path / 'routing.png'), '--json', str(tmp_path / 'r.json')])
    history = plot_routing.routing_history(run_dir)
    layers = len(history)
    assert sorted(history) == list(range(layers)) and all(sorted(h) == [0, 1, 2] for h in history.values())
    assert history[0][0][0] == [10, 20]  # logged every 10th step and at the last
    fig = plot_routing.routing_layers_figure(weights, [0, 1, 2], history)
    heatmap, *panels = [ax for ax in fig.axes if ax.images or ax.lines]
    np.testing.assert_allclose(heatmap.images[0].get_array(), weights)
    assert len(panels) == layers
    for layer, ax in enumerate(panels):
        for order, line in zip((0, 1, 2), ax.lines):
            np.testing.assert_allclose(line.get_ydata(), history[layer][order][1])
    saved = json.loads((tmp_path / 'r.json').read_text())
    np.testing.assert_allclose(saved['mean_routing_weights'], weights)
    assert (tmp_path / 'routing.png').stat().st_size > 10_000
    with pytest.raises(SystemExit, match='plain ViT'):
        plot_routing.main([str(runs['plain', 1][0]), '--out', str(tmp_path / 'plain.png')])


@pytest.mark.parametrize('env, mode, message', [
    ({'SEEDS': 'one two'}, 'compare', "SEEDS='one two'; expected a count"),
    ({'SEEDS': '0'}, 'compare', "SEEDS='0'; expected a count"),
    ({}, 'contrast', "unknown mode 'contrast'"),
])
def test_demo_script_refuses_bad_settings_before_training(tmp_path, env, mode, message):
    result = subprocess.run(['bash', 'scripts/demo.sh', mode], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={'PATH': '/usr/bin:/bin', 'OUTPUT_DIR': str(tmp_path), 'PY': 'false', **env})
    assert result.returncode == 2 and message in result.stderr and not list(tmp_path.iterdir())


def test_demo_script_seed_list():
    seeds = {}
    for value in ('3', ' 4 ', '7 3  11'):
        script = f'SEEDS="{value}"; source <(sed -n "/^seed_list()/,/^}}/p" scripts/demo.sh); seed_list'
        seeds[value] = subprocess.run(['bash', '-c', script], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert seeds == {'3': ['1', '2', '3'], ' 4 ': ['1', '2', '3', '4'], '7 3  11': ['7', '3', '11']}
