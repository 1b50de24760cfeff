"""benchmarks/gpu_check.py: its --dry run reaches every section and writes its tables; its tests run most valuable
first; a cut or a hang still writes the tables; the tuning sweep picks among launch configurations (under Triton's
interpreter); bad arguments stop with one line; ml_collections installs from the carried wheels without an index."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from train_helpers import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import gpu_check  # noqa: E402

SECTIONS = ['tests', 'steps', 'attention', 'sync', 'tune', 'compiled', 'mfu', 'train', 'ddp', 'loader']


def test_dry_run_reports_every_section_and_writes_its_tables(tmp_path):
    run = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--dry'], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, 'OUT': str(tmp_path), 'CUDA_VISIBLE_DEVICES': ''})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['dry'] is True
    statuses = {section['name']: section['status'] for section in report['sections']}
    assert list(statuses) == SECTIONS
    failed = {section['name']: section['headline'] for section in report['sections'] if section['status'] == 'failed'}
    assert not failed, failed
    assert all(status == 'ok' or status.startswith('skipped: no CUDA') for status in statuses.values()), statuses
    rows = {section['name']: section['rows'] for section in report['sections']}
    assert any('ms' in row for row in rows['steps']) and any('ms' in row for row in rows['attention'])
    assert [row['name'] for row in rows['tests']] == [name for name, _ in gpu_check.TESTS]  # counted per group
    flex_rows = [row for row in rows['tune'] if ' flex block ' in row['name']]
    assert len(flex_rows) == 2 and all(row['max_error_vs_dense'] < 1e-5 for row in flex_rows)  # float32 on the CPU
    assert sum(bool(row.get('picked')) for row in flex_rows) == 1
    assert rows['train'][0]['steps'] == 3 and rows['ddp'][0]['world_size'] == 1
    assert rows['train'][0]['attention'] in ('shared_scores', 'dense')  # eager: no flex compile in its runs
    assert all(row['images_s'] > 0 for row in rows['loader'])
    markdown = (tmp_path / 'gpu_check.md').read_text()
    assert all(f'## {name}: ' in markdown for name in SECTIONS)
    log = (tmp_path / 'gpu_check.log').read_text()
    assert log.strip() and log.splitlines()[-1] == run.stdout.strip().splitlines()[-1]
    short_table = run.stdout[run.stdout.rindex('| section | status |'):]
    assert all(f'| {name} | ' in short_table for name in SECTIONS)


@pytest.fixture
def carried_wheel():
    """The ml_collections wheel in .wheels/, downloaded as the README says when missing (PyPI is reachable here)."""
    if not list((ROOT / '.wheels').glob('ml_collections-*.whl')):
        download = subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                                   '-d', str(ROOT / '.wheels'), 'ml_collections'],
                                  capture_output=True, text=True, timeout=300)
        if download.returncode != 0:
            pytest.skip(f"no ml_collections wheel in .wheels/ and pip download failed: {download.stderr[-300:]}")


def test_ml_collections_installs_from_the_carried_wheel_without_an_index(tmp_path, carried_wheel):
    """With ml_collections hidden (a shadow package that fails to import), the check installs the wheel offline."""
    shadow = tmp_path / 'shadow' / 'ml_collections'
    shadow.mkdir(parents=True)
    (shadow / '__init__.py').write_text("raise ImportError('hidden for the test')\n")
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; print(gpu_check.ensure_ml_collections()); "
            "import ml_collections, os; print(ml_collections.__file__); print(os.environ['PYTHONPATH'])")
    env = {**os.environ, 'PYTHONPATH': str(shadow.parent), 'TMPDIR': str(tmp_path), 'PIP_NO_INDEX': '1'}
    run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    message, location, pythonpath = run.stdout.strip().splitlines()[-3:]
    assert message.startswith('ml_collections: installed from ml_collections-')
    assert location.startswith(str(tmp_path / 'gpu_check_site'))
    assert pythonpath.split(os.pathsep)[0] == str(tmp_path / 'gpu_check_site')  # children import it too


def test_tests_run_most_valuable_first_and_leave_none_out():
    """pytest collects the TESTS groups in their order (Triton first, end to end last), each group finds tests, flex
    comes after the other implementations, and every test of the CUDA test files belongs to a group."""
    node_ids = [node for _, node in gpu_check.TESTS]
    run = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', *node_ids], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    collected = [line for line in run.stdout.splitlines() if '::' in line]
    groups = [gpu_check.test_group(node) for node in collected]
    order = [name for name, _ in gpu_check.TESTS]
    assert sorted(set(groups), key=order.index) == order and 'other' not in groups
    assert groups == sorted(groups, key=order.index)  # pytest keeps the given order
    formula = [node for node, group in zip(collected, groups) if group == 'implementations vs float64']
    assert formula[0].split('[')[1].startswith('triton') and not any('[flex' in node for node in formula)
    # every test function of both
    for path in ('tests/attention/test_attention_cuda.py', 'tests/training/test_cuda_training.py'):
        defined = set(re.findall(r'^def (test_\w+)', (ROOT / path).read_text(), flags=re.M))
        assert defined == {node.split('::')[1].split('[')[0] for node in collected if node.startswith(path)}, path


def run_check(tmp_path, code: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict, float]:
    """Run `code` (Python, with gpu_check imported as g) in a fresh process; its exit, gpu_check.json and seconds."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_check as g\n"
    started = time.monotonic()
    run = subprocess.run([sys.executable, '-c', prelude + code], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    report = tmp_path / 'gpu_check.json'
    return run, json.loads(report.read_text()) if report.exists() else {}, time.monotonic() - started


def test_a_subprocess_past_its_budget_is_reported_cut_not_failed(tmp_path):
    """train.py runs that outlast the section are killed at its end: rows and section say 'cut at N s'."""
    code = ("g.train_command = lambda *args, **kwargs: [sys.executable, '-c', 'import time; time.sleep(60)']\n"
            f"g.main(['--dry', '--budget', '10', '--sections', 'train', '--out', {str(tmp_path)!r}])\n")
    run, report, seconds = run_check(tmp_path, code)
    assert run.returncode == 0, run.stderr[-2000:]
    train = next(s for s in report['sections'] if s['name'] == 'train')
    assert re.fullmatch(r'cut at \d+ s \(1 rows cut\)', train['status']), train
    assert re.fullmatch(r'cut at \d+ s', train['rows'][0]['cut'])
    assert seconds < 60


def test_a_hang_in_the_main_process_still_writes_the_tables(tmp_path):
    """The watchdog ends a run stuck past its budget: the stack goes to the log, the section is marked cut, the
    tables and the summary are written, the finished sections' rows kept."""
    code = ("import time\n"
            "g.WATCHDOG_GRACE = 1\n"
            "def done(check):\n"
            "    check.section.rows.append({'name': 'kept', 'ms': 1.0}); return 'fine'\n"
            "def hang(check):\n"
            "    time.sleep(120)\n"
            "g.SECTIONS[:] = [g.Section('first', 1, done), g.Section('stuck', 1, hang)]\n"
            f"g.main(['--dry', '--budget', '2', '--out', {str(tmp_path)!r}])\n")
    run, report, seconds = run_check(tmp_path, code)
    assert run.returncode == 0, run.stderr[-2000:]
    statuses = {s['name']: s['status'] for s in report['sections']}
    assert statuses['first'] == 'ok' and re.fullmatch(r'cut at \d+ s by the watchdog', statuses['stuck'])
    assert report['sections'][0]['rows'] == [{'name': 'kept', 'ms': 1.0}]
    assert '| stuck | cut at ' in run.stdout and 'in hang' in (tmp_path / 'gpu_check.log').read_text()
    assert seconds < 60


def test_triton_sweep_picks_among_launch_configurations_under_the_interpreter(tmp_path):
    """The tune section's sweep on a tiny shape with Triton's interpreter: every configuration launches with its
    own tiles, computes what the dense implementation does, and exactly one (the fastest) is picked; the kernels'
    setting is restored afterwards."""
    pytest.importorskip('triton', reason='Triton is not installed')
    code = ("import argparse, json\n"
            "from tests.conftest import index_scalars_of_one_element\n"
            "index_scalars_of_one_element()\n"
            "g.import_project()\n"
            "from model.attention import triton_kernel as tk\n"
            "seen, init = [], tk._Launch.__init__\n"
            "def record(self, *a):\n"
            "    init(self, *a); seen.append((self.block_m, self.block_n, self.meta['num_warps']))\n"
            "tk._Launch.__init__ = record\n"
            "configs = [dict(block_m=16, block_n=16, num_warps=4, num_stages=1),"
            " dict(block_m=32, block_n=16, num_warps=2, num_stages=1)]\n"
            "tk.CUDA_LAUNCH_CANDIDATES = configs\n"
            f"args = argparse.Namespace(dry=True, budget=60.0)\n"
            f"check = g.Check(args, __import__('pathlib').Path({str(tmp_path)!r}), open('/dev/null', 'w'))\n"
            "check.section = g.Section('tune', 60, None)\n"
            "best = g.sweep(check, 'tiny triton', 'triton', g.triton_settings(), g.bench_args(check, 16, 1, '0,1'))\n"
            "print(json.dumps({'rows': check.section.rows, 'seen': sorted(set(seen)),"
            " 'override': tk.LAUNCH_OVERRIDE, 'best': best['name']}))\n")
    run = subprocess.run([sys.executable, '-c', f"import sys; sys.path.insert(0, 'benchmarks'); import gpu_check as g\n"
                          + code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'TRITON_INTERPRET': '1', 'CUDA_VISIBLE_DEVICES': ''})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert [row['name'] for row in result['rows']] == ['tiny triton m16 n16 w4 s1', 'tiny triton m32 n16 w2 s1']
    assert all(row['max_error_vs_dense'] < 1e-5 and row['ms'] > 0 for row in result['rows']), result['rows']
    assert [bool(row.get('picked')) for row in result['rows']].count(True) == 1
    assert result['best'] == min(result['rows'], key=lambda row: row['ms'])['name']
    assert {16, 32} <= {m for m, _, _ in result['seen']} and result['override'] is None


@pytest.mark.parametrize('flags, message', [
    (['--budget', '-5'], '--budget -5: expected a positive number of seconds'),
    (['--budget', '0'], '--budget 0: expected a positive number of seconds'),
    (['--budget', 'nan'], '--budget nan: expected a positive number of seconds'),
    (['--sections', 'steps,nope'], "--sections 'steps,nope': unknown nope; expected some of tests, steps"),
    (['--sections', ','], "--sections ',': none named; expected some of"),
])
def test_bad_arguments_stop_with_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.parse_args(['--dry', *flags])
    assert stopped.value.code == 2
    assert 'error: ' + message in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_output_place_that_cannot_be_written_stops_with_one_line(tmp_path, capsys):
    """--out naming a file, a folder under a file, or a read-only folder: one line, nothing else written."""
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('mine')
    read_only = tmp_path / 'read_only'
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [(a_file, 'is a file; expected a folder'), (a_file / 'out', 'cannot write there'),
             (read_only, 'cannot write there')]
    if os.geteuid() == 0:  # root writes anywhere
        cases = cases[:2]
    for out, message in cases:
        with pytest.raises(SystemExit):
            gpu_check.parse_args(['--dry', '--out', str(out)])
        assert f'error: --out {out}: {message}' in capsys.readouterr().err.strip().splitlines()[-1]
    assert a_file.read_text() == 'mine' and list(read_only.iterdir()) == []
