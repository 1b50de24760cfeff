"""benchmarks/gpu_check.py: its --dry run reaches every section and writes its tables; ml_collections installs from
the carried wheels without a package index."""
import json
import os
import subprocess
import sys

import pytest

from train_helpers import ROOT

SECTIONS = ['tests', 'sync', 'steps', 'mfu', 'attention', 'train', 'ddp', 'loader']


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
    assert rows['train'][0]['steps'] == 3 and rows['ddp'][0]['world_size'] == 1
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
        download = subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '-d', str(ROOT / '.wheels'),
                                   'ml_collections'], capture_output=True, text=True, timeout=300)
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
