"""scripts/plot_curves.py, scripts/plot_routing.py, scripts/make_pics.py and scripts/demo.sh, on a few tiny runs.

The seed comparison itself (ten runs of 1,200 steps) belongs to `bash scripts/demo.sh compare`, not to the
suite: here two seeds of a routed and a plain model train for 20 steps, and every figure the scripts report
is checked against what train.py printed and wrote, or against an independent computation. demo.sh runs
with a stand-in for Python that records each command, so what it asks of train.py is checked without training.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from PIL import Image
from torch.utils.data import DataLoader, Subset

import train
from train_helpers import ROOT, tiny_args
from utils import tool
from utils.errors import command_line

sys.path.insert(0, str(ROOT / 'scripts'))
sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench  # noqa: E402
import make_pics  # noqa: E402
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
    assert record['best_acc'] == pytest.approx(results['best_acc'])
    assert record['final_acc'] == pytest.approx(results['final_acc'])
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
    written = json.loads((tmp_path / 'summary.json').read_text())
    assert written.pop('written_by') == 'written by TRAR-ViT plot_curves.py'
    assert written == json.loads(json.dumps(summary))
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
    with pytest.raises(ValueError, match=r'seed 1\) is paired with .*seed 2\)'):
        plot_curves.summarize([('TRAR', trar), ('plain', plain[::-1])], 0.5)
    shifted = [dict(plain[0], steps=[s + 1 for s in plain[0]['steps']]), plain[1]]
    with pytest.raises(ValueError, match='other steps than'):
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
    weights = plot_routing.main([str(run_dir), '--out', str(tmp_path / 'routing.png'),
                                 '--json', str(tmp_path / 'r.json')])
    history = plot_routing.routing_history(run_dir)
    layers = len(history)
    assert sorted(history) == list(range(layers)) and all(sorted(h) == [0, 1, 2] for h in history.values())
    assert history[0][0][0] == [5, 10, 15, 20]  # logged every 10th step and at every evaluation (every 5th)
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
    with pytest.raises(ValueError, match='plain ViT'):
        plot_routing.main([str(runs['plain', 1][0]), '--out', str(tmp_path / 'plain.png')])


# ---------------------------------------------------------------------------------------------
# Bad arguments and files: one line naming the script, nothing written or replaced


def run_tool(module, argv, capsys) -> tuple[int, str]:
    """Run a script as its `__main__` does (utils/errors.py's exit): (exit status, the last stderr line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        command_line(module.main, module.TOOL, [str(a) for a in argv], expected=tool.EXPECTED)
    err = capsys.readouterr().err.strip().splitlines()
    return exit.value.code, err[-1] if err else ''


def copy_run(run_dir, to) -> Path:
    shutil.copytree(run_dir, to)
    return to


def curves_args(runs, *extra) -> list:
    return ['--model', 'TRAR', runs['trar', 1][0], *extra]


@pytest.mark.parametrize('out, expected', [
    ('curves.txt', '--out {tmp}/curves.txt: expected a file name ending in .pdf, .png or .svg'),
    ('last.ckpt', '--out {tmp}/last.ckpt: a checkpoint or weights file is never written over'),
    ('taken.png', '--out {tmp}/taken.png exists and was not written by this project'),
    ('a_file/curves.png', '--out {tmp}/a_file/curves.png: {tmp}/a_file is a file, not a folder'),
])
def test_plot_curves_refuses_an_output_it_may_not_write_before_reading_the_logs(runs, tmp_path, capsys, out, expected):
    (tmp_path / 'taken.png').write_bytes(b'a picture of mine')
    (tmp_path / 'a_file').write_text('not a folder')
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    code, line = run_tool(plot_curves, curves_args(runs, '--out', tmp_path / out), capsys)
    assert code == 1 and line.startswith('plot_curves.py: error: ' + expected.format(tmp=tmp_path))
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_plot_curves_refuses_an_unwritable_place_and_a_taken_summary(runs, tmp_path, capsys):
    code, line = run_tool(plot_curves, curves_args(runs, '--out', '/proc/curves.png'), capsys)
    assert code == 1 and line.startswith('plot_curves.py: error: --out /proc/curves.png: cannot write in /proc')
    (tmp_path / 'summary.md').write_text('# my notes\n')
    code, line = run_tool(plot_curves, curves_args(runs, '--out', tmp_path / 'c.png', '--summary',
                                                   tmp_path / 'summary'), capsys)
    assert code == 1 and 'summary.md exists and was not written by' in line
    assert (tmp_path / 'summary.md').read_text() == '# my notes\n' and not (tmp_path / 'c.png').exists()
    # what the script wrote itself it may write again
    for _ in range(2):
        code, _ = run_tool(plot_curves, curves_args(runs, '--out', tmp_path / 'c.png', '--summary',
                                                    tmp_path / 'again'), capsys)
        assert code == 0


@pytest.mark.parametrize('damage, expected', [
    ('truncate last.ckpt', r'last\.ckpt is not a readable checkpoint'),
    ('break results.json', r'results\.json is not the JSON object train\.py writes'),
])
def test_plot_curves_reports_a_damaged_run_in_one_line(runs, tmp_path, capsys, damage, expected):
    run = copy_run(runs['trar', 1][0], tmp_path / 'run')
    name = damage.split()[1]
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[:len(data) // 2])
    code, line = run_tool(plot_curves, ['--model', 'TRAR', run, '--out', tmp_path / 'c.png'], capsys)
    assert code == 1 and re.match(r'plot_curves\.py: error: .*' + expected, line)
    assert not (tmp_path / 'c.png').exists()


@pytest.mark.parametrize('argv, expected', [
    (['--threshold', '2'], '--threshold 2.0: expected an accuracy between 0 and 1'),
    (['--model', 'plain', '{tmp}/moved'], "--model 'plain': run folder {tmp}/moved does not exist"),
])
def test_plot_curves_checks_its_arguments_up_front(runs, tmp_path, capsys, argv, expected):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, line = run_tool(plot_curves, curves_args(runs, '--out', tmp_path / 'c.png', *argv), capsys)
    assert code == 2 and line.startswith('plot_curves.py: error: ' + expected.format(tmp=tmp_path))


def edited_checkpoint(run_dir, to, edit) -> Path:
    """A copy of a run folder whose last.ckpt `edit(checkpoint)` changed (a hand-edited file)."""
    run = copy_run(run_dir, to)
    checkpoint = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, run / 'last.ckpt')
    return run


def drop_last_layer(checkpoint):
    layers = checkpoint['config']['transformer']['num_layers']
    checkpoint['config']['transformer']['num_layers'] = layers - 1
    prefix = f'transformer.encoder.layer.{layers - 1}.'
    checkpoint['state_dict'] = {k: v for k, v in checkpoint['state_dict'].items() if not k.startswith(prefix)}


def poison(checkpoint):
    checkpoint['state_dict']['head.bias'][3] = float('inf')


def move_data(checkpoint):
    checkpoint['args'].update(dataset='imagenet', data_dir='/nonexistent/imagenet')


@pytest.mark.parametrize('edit, argv, expected', [
    (None, ['--batch_size', '0'], r'--batch_size 0: expected a positive integer'),
    (None, ['--out', 'routing.jpg'], r'--out routing\.jpg: expected a file name ending in \.pdf, \.png or \.svg'),
    (None, ['--json', '{run}/last.ckpt'], r'--json .*last\.ckpt: a checkpoint or weights file is never written over'),
    ('truncate', [], r'last\.ckpt is not a readable checkpoint'),
    (drop_last_layer, [], r'last\.ckpt \(1 layers, orders \[0, 1, 2\]\) is not the model whose routing .* logged '
                          r'\(2 layers'),
    (poison, [], r'head\.bias holds NaN or infinite values; expected finite weights'),
    (move_data, [], r"the run's imagenet data is not at /nonexistent/imagenet: .*; pass --data_dir"),
])
def test_plot_routing_reports_bad_arguments_and_files_in_one_line_naming_itself(runs, tmp_path, capsys, edit, argv,
                                                                                 expected):
    run = runs['trar', 1][0]
    if edit == 'truncate':
        run = copy_run(run, tmp_path / 'run')
        data = (run / 'last.ckpt').read_bytes()
        (run / 'last.ckpt').write_bytes(data[:1000])
    elif edit is not None:
        run = edited_checkpoint(run, tmp_path / 'run', edit)
    before = (run / 'last.ckpt').read_bytes()
    argv = [a.format(run=run) for a in argv]
    code, line = run_tool(plot_routing, [run, *argv] if '--out' in argv else [run, '--out', tmp_path / 'r.png', *argv],
                          capsys)
    assert code in (1, 2) and re.match(r'plot_routing\.py: error: .*' + expected, line), line
    assert (run / 'last.ckpt').read_bytes() == before and not (tmp_path / 'r.png').exists()


def test_make_pics_writes_every_picture_or_none(tmp_path, capsys):
    code, _ = run_tool(make_pics, ['--out', tmp_path / 'pic'], capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / 'pic').iterdir()) == sorted(
        [f'digit_{d}.png' for d in range(10)] + ['1.jpg'])
    for name in ('digit_3.png', '1.jpg'):  # the committed pictures: what the script writes, pixel for pixel
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'pic' / name)),
                                      np.asarray(Image.open(ROOT / 'pic' / name)))
    assert run_tool(make_pics, ['--out', tmp_path / 'pic'], capsys)[0] == 0  # its own files: replaced
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'digit_7.png').write_bytes(b'my drawing')
    code, line = run_tool(make_pics, ['--out', tmp_path / 'mine'], capsys)
    assert code == 1 and line.startswith(f"make_pics.py: error: --out {tmp_path / 'mine' / 'digit_7.png'} exists "
                                         "and was not written by")
    assert [p.name for p in (tmp_path / 'mine').iterdir()] == ['digit_7.png']
    code, line = run_tool(make_pics, ['--size', '0', '--out', tmp_path / 'other'], capsys)
    assert code == 2 and line == 'make_pics.py: error: --size 0: expected a side from 1 to 1024 pixels'


# ---------------------------------------------------------------------------------------------
# demo.sh, with a stand-in for Python that records what it is asked to run

FAKE_PYTHON = '''#!/usr/bin/env bash
printf '%q ' "$@" >>"$CALLS"; echo >>"$CALLS"
if [[ ${1:-} == - ]]; then cat >/dev/null; fi
'''


def run_demo(tmp_path, mode='', **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run scripts/demo.sh MODE with OUTPUT_DIR and DOCS_DIR in tmp_path: (the result, the Python commands)."""
    fake, calls = tmp_path / 'python', tmp_path / 'calls'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls.write_text('')
    result = subprocess.run(['bash', 'scripts/demo.sh', *([mode] if mode else [])], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={'PATH': os.environ['PATH'], 'PY': str(fake),
                                                        'OUTPUT_DIR': str(tmp_path / 'out'),
                                                        'DOCS_DIR': str(tmp_path / 'docs'), 'CALLS': str(calls),
                                                        **env})
    return result, [shlex.split(line) for line in calls.read_text().splitlines()]


def trained_runs(commands) -> list[list[str]]:
    return [command[1:] for command in commands if command[0] == 'train.py']


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_demo_trains_the_model_bench_times(tmp_path):
    """The demo's model is defined once: what demo.sh asks train.py to build is bench.py --preset demo's model."""
    result, commands = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr
    (demo_args,) = trained_runs(commands)
    assert flag(demo_args, '--name') == 'demo'
    trained = train.get_args(demo_args)
    preset = argparse.Namespace(**bench.PRESETS['demo'])
    assert train.build_config(trained).to_dict() == bench.model_config(preset).to_dict()
    assert bench.build('trar', preset).config.transformer.orders == [0, 1, 2]
    assert (trained.img_size, trained.train_batch_size) == (preset.img_size, preset.batch)
    assert any(c[:3] == ['test.py', '--ckpt', str(tmp_path / 'out' / 'demo' / 'best.ckpt')] for c in commands)


@pytest.mark.parametrize('mode, env, message', [
    ('compare', {'SEEDS': 'one two'}, "SEEDS='one two'; expected a count"),
    ('compare', {'SEEDS': '0'}, "SEEDS='0'; expected a count"),
    ('compare', {'SEEDS': '3 3'}, "SEEDS='3 3' gives seed 3 twice; expected distinct seeds"),
    ('compare', {'SEEDS': '007 7'}, "SEEDS='007 7' gives seed 7 twice; expected distinct seeds"),
    ('recipes', {'SEEDS': '0'}, "SEEDS='0'; expected a count"),
    ('contrast', {}, "unknown mode 'contrast'"),
])
def test_demo_refuses_bad_settings_before_training(tmp_path, mode, env, message):
    result, commands = run_demo(tmp_path, mode, **env)
    line, = result.stderr.strip().splitlines()
    assert result.returncode == 2 and line.startswith(f'demo.sh: error: {message}')
    assert commands == [] and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('seeds, expected', [('3', [1, 2, 3]), (' 4 ', [1, 2, 3, 4]), ('7 3  11', [7, 3, 11]),
                                             ('007 8', [7, 8])])
def test_demo_compare_trains_each_seed_once_per_model(tmp_path, seeds, expected):
    result, commands = run_demo(tmp_path, 'compare', SEEDS=seeds)
    assert result.returncode == 0, result.stderr
    names = [flag(args, '--name') for args in trained_runs(commands)]
    assert names == [f'demo_{model}_seed{seed}' for seed in expected for model in ('trar', 'plain')]
    assert [int(flag(args, '--seed')) for args in trained_runs(commands)] == [s for s in expected for _ in (0, 1)]


def test_demo_recipes_trains_both_models_under_vit_and_deit(tmp_path):
    """`recipes`: per seed the compare runs (the vit recipe) and the same two models under deit with every part on;
    the statistics of the live weights, and of the deit runs' EMA, from plot_curves.py."""
    result, commands = run_demo(tmp_path, 'recipes', SEEDS='2 5')
    assert result.returncode == 0, result.stderr
    runs = {flag(args, '--name'): train.get_args(args) for args in trained_runs(commands)}
    models = ('trar', 'plain', 'trar_deit', 'plain_deit')
    assert list(runs) == [f'demo_{model}_seed{seed}' for seed in (2, 5) for model in models]
    (tmp_path / 'compare').mkdir()
    _, compared = run_demo(tmp_path / 'compare', 'compare', SEEDS='2 5')
    for args in trained_runs(compared):  # the vit runs are the compare runs (but for where they write)
        expected = vars(train.get_args(args)) | {'output_dir': str(tmp_path / 'out')}
        assert vars(runs[flag(args, '--name')]) == expected
    for seed in (2, 5):
        vit, deit = runs[f'demo_trar_seed{seed}'], runs[f'demo_trar_deit_seed{seed}']
        assert (vit.recipe, deit.recipe) == ('vit', 'deit') and vit.seed == deit.seed == seed
        assert deit.mixup > 0 and deit.drop_path > 0 and deit.aa and deit.model_ema and deit.opt == 'adamw'
        assert deit.augment == 'crop' and deit.model_ema_decay == 0.99  # no flips of digits; an EMA for 1,200 steps
        assert runs[f'demo_plain_deit_seed{seed}'].orders == 'none' and deit.orders is None
    plots = [command[1:] for command in commands if command[0] == 'scripts/plot_curves.py']
    assert [flag(args, '--tag') for args in plots] == ['val/accuracy', 'val/ema_accuracy']
    assert plots[0][plots[0].index('TRAR-ViT, deit') + 1:][:2] == [str(tmp_path / 'out' / f'demo_trar_deit_seed{s}')
                                                                  for s in (2, 5)]


def test_demo_replaces_only_run_folders_it_made(tmp_path):
    mine = tmp_path / 'out' / 'demo'
    mine.mkdir(parents=True)
    (mine / 'notes.txt').write_text('my own run of that name')
    result, commands = run_demo(tmp_path)
    assert result.returncode == 1 and commands == []
    assert result.stderr.strip() == (f"demo.sh: error: {mine} exists and was not made by demo.sh: it is never "
                                     "replaced; move it or set OUTPUT_DIR to another folder")
    assert [p.name for p in mine.iterdir()] == ['notes.txt']
    # compare checks every run folder before the first run trains
    result, commands = run_demo(tmp_path, 'compare', SEEDS='1 2')
    assert result.returncode == 0 and len(trained_runs(commands)) == 4
    (tmp_path / 'out' / 'demo_plain_seed2' / '.made-by-demo.sh').unlink()
    result, commands = run_demo(tmp_path, 'compare', SEEDS='1 2')
    assert result.returncode == 1 and commands == [] and 'demo_plain_seed2 exists and was not made' in result.stderr
    # its own folders it replaces, through train.py, which removes only a run's own files
    shutil.rmtree(mine)
    for _ in range(2):
        result, commands = run_demo(tmp_path)
        assert result.returncode == 0 and '--overwrite' in trained_runs(commands)[0]
