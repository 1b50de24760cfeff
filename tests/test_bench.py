"""benchmarks/bench.py: its baselines compute routed attention, and the script prints its tables from a fresh process."""
import re
import subprocess
import sys

import pytest
import torch

from model.attention import Spans, routed_attention
from tests.test_routed_attention_impl import inputs
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


def test_demo_preset_is_the_demo_scripts_model():
    """`--preset demo` builds what scripts/demo.sh trains: its --set fields, image size, orders and batch."""
    import argparse

    preset = bench.PRESETS['demo']
    demo = (ROOT / 'scripts' / 'demo.sh').read_text()
    for key, value in preset['config'].items():
        assert f'--set {key}={value}' in demo
    for flag in (f"--model_type {preset['model_type']}", f"--img_size {preset['img_size']}",
                 f"--orders {preset['orders']}", f"--train_batch_size {preset['batch']}"):
        assert flag in demo
    model = bench.build('trar', argparse.Namespace(**preset))
    attention = model.transformer.encoder.layer[0].attn
    assert (model.config.hidden_size, len(model.transformer.encoder.layer), attention.num_heads) == (64, 4, 4)
    assert model.grid == (8, 8) and attention.orders == [0, 1, 2] and model.head.out_features == 10
