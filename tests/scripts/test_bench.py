"""benchmarks/bench.py: its baselines compute routed attention, and the script prints its tables from a fresh
process."""
import argparse
import re
import subprocess
import sys

import pytest
import torch

from model.attention import Spans, routed_attention
from tests.conftest import routed_inputs as inputs
from tests.train_helpers import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench  # noqa: E402


@pytest.mark.parametrize('name', ['stacked (original)', 'fused SDPA per order'])
def test_baselines_compute_routed_attention(name):
    """The stacked maps of the original code and the per-order path compute what routed_attention does."""
    q, k, v, masks, alphas = inputs(2, 3, (4, 5), [0, 1, 2], 8)
    expected = routed_attention(q, k, v, alphas, Spans((4, 5), [0, 1, 2]))
    torch.testing.assert_close(bench.ATTENTION[name](q, k, v, masks, alphas), expected)


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table under the line starting with `header`, by first cell."""
    rows = []
    for line in text[text.index(header):].splitlines()[2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split(' | ')])
    return {row[0]: row[1:] for row in rows}


def test_bench_prints_every_table():
    """A tiny run (32 px: a 2x2 patch grid) prints each variant, each attention and the inference rows;
    the ratios are the printed times divided by the reference row's."""
    command = [sys.executable, 'benchmarks/bench.py', '--img_size', '32', '--batch', '1', '--orders', '0,1',
               '--repeats', '1', '--warmup', '0', '--attention_layers', '2', '--no_memory']
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    steps = table_rows(run.stdout, '| variant |')
    assert {'plain', 'trar', 'stacked'} <= set(steps)
    plain = float(steps['plain'][0])
    for time, ratio, *_ in steps.values():
        # Times print to 3 decimals (half a millisecond each way) and ratios to 2, from the unrounded times.
        expected = float(time) / plain
        rounding = 0.005 + expected * 0.0005 * (1 / float(time) + 1 / plain)
        assert float(ratio.rstrip('x')) == pytest.approx(expected, abs=rounding)
    for header in ('| attention alone, fwd+bwd, 1 layer |', '| attention alone, fwd+bwd, 2 layers'):
        assert list(table_rows(run.stdout, header)) == list(bench.ATTENTION)
    assert re.search(r'The seven \(N, N\) x \(N, d\) products alone take [\d.]+ ms', run.stdout)
    assert list(table_rows(run.stdout, '| inference (no grad) |')) == ['plain', 'trar soft', 'trar binarized']


@pytest.mark.parametrize('flags, message', [
    (['--batch', '0'], '--batch 0: expected an integer of at least 1'),
    (['--repeats', '0'], '--repeats 0: expected an integer of at least 1'),
    (['--warmup', '-1'], '--warmup -1: expected an integer of at least 0'),
    (['--threads', '0'], '--threads 0: expected an integer of at least 1'),
    (['--attention_layers', '0'], '--attention_layers 0: expected an integer of at least 1'),
    (['--img_size', '30'], '--img_size 30: expected a positive multiple of the patch size, 16'),
    (['--img_size', '0'], '--img_size 0: expected a positive multiple of the patch size, 16'),
    (['--img_size', '64', '--orders', '0,9'], r'--orders 0,9: order 9 is not in \[0, 4\) for a 4x4 patch grid'),
    (['--orders', 'x'], "--orders x: orders 'x': expected comma-separated integers"),
    (['--orders', 'none'], '--orders none: expected at least one order'),
    (['--orders', '1,1'], '--orders 1,1: orders must be distinct'),
    (['--preset', 'demo', '--orders', '0,9'], r'--orders 0,9: order 9 is not in \[0, 8\) for a 8x8 patch grid'),
    (['--preset', 'demo', '--batch', '0'], '--batch 0: expected an integer of at least 1'),
    (['--preset', 'demo', '--img_size', '30'], '--img_size 30: expected a positive multiple of the patch size, 4'),
])
def test_bad_arguments_stop_with_one_line_before_any_work(capsys, monkeypatch, flags, message):
    """Each refused value ends the script (exit status 2) with one line naming it, before a model is built."""
    monkeypatch.setattr(bench, 'build', lambda *args: pytest.fail('a model was built'))
    with pytest.raises(SystemExit) as stopped:
        bench.main(flags)
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r'\S+: error: ' + message + '.*', last), last


def test_a_flag_given_beside_a_preset_is_what_is_measured(capsys, monkeypatch):
    """--preset sets defaults: --img_size 64 and --batch 3 beside it are measured, not silently replaced by its own."""
    class Measured(Exception):
        pass

    def measured(args):
        raise Measured(args.img_size, args.batch, args.orders)
    monkeypatch.setattr(bench, 'variants', measured)
    with pytest.raises(Measured) as stopped:
        bench.main(['--preset', 'demo', '--img_size', '64', '--batch', '3', '--threads', '1'])
    assert stopped.value.args == (64, 3, '0,1,2')  # the preset's orders, the flags' size and batch
    assert capsys.readouterr().out.startswith('# demo 64px, batch 3, orders [0,1,2]')


def test_cuda_without_cuda_stops_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit):
        bench.main(['--device', 'cuda'])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        ' error: --device cuda: no CUDA device is available here; expected --device cpu')


def test_attention_inputs_build_the_spans_on_the_inputs_device():
    """bench's routed attention gets the model's spans (masks and layout), moved to the device of q: `meta` here,
    so a tensor left on the CPU would show."""
    import argparse

    args = argparse.Namespace(model_type='testing', img_size=32, batch=2, orders='0,1', dtype='fp32')
    inputs = bench.attention_inputs(args, torch.device('meta'))
    spans = inputs.spans
    assert {t.device.type for t in (*inputs[:5], *spans.buffers())} == {'meta'}
    assert inputs.q.shape == (2, 2, 65, 16) and inputs.masks.shape == (2, 65, 65)


def test_recipes_rows_time_train_py_steps_with_every_deit_part_on():
    """--recipes on the demo's model: train.py's step under vit and under deit with every part on (ratios from
    the printed times), and the loader's transform per image under each."""
    deit = bench.recipe_args(bench.RECIPE_STEPS['deit, layer decay 0.65'], argparse.Namespace(
        img_size=32, batch=2, orders='0,1', device='cpu', dtype='fp32', compile=False))
    assert deit.opt == 'adamw' and deit.layer_decay == 0.65 and deit.model_ema and deit.drop_path > 0
    assert deit.mixup > 0 and deit.cutmix > 0 and deit.smoothing > 0 and deit.aa and deit.reprob > 0
    command = [sys.executable, 'benchmarks/bench.py', '--preset', 'demo', '--batch', '2', '--recipes',
               '--repeats', '1', '--warmup', '0', '--no_memory']
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for header, scale in (('| recipe, TRAR model, one optimizer step', 1), ('| recipe, training transform', 1e-3)):
        rows = table_rows(run.stdout, header)
        assert list(rows) == list(bench.RECIPE_STEPS)
        for time, ratio, *_ in rows.values():
            assert float(ratio.rstrip('x')) == pytest.approx(float(time) / float(rows['vit'][0]), abs=0.01 + 0.01 *
                                                             float(ratio.rstrip('x')))
