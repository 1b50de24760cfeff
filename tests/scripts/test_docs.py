"""README.md and docs/*.md against the repository: links resolve, README stays a front page, the scripts' flags
that the documentation names exist, and the cheap commands it names run.

The flags are checked against each script's `--help`, not against a list, so a flag added to a script needs no
change here, and a flag the documentation names that the script lacks fails.
"""
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / 'README.md'
DOCS = [README, *sorted((ROOT / 'docs').glob('*.md'))]
README_MAX_BYTES = 12 * 1024  # a front page, as MAE's (5.7 KB) and nanoGPT's (14 KB) are
SCRIPTS = ('train.py', 'eval.py', 'test.py')
# Command words whose extra arguments go to a script: train.sh and train_fp16.sh pass theirs to train.py.
PASSES_TO = {'train.py': 'train.py', 'train.sh': 'train.py', 'train_fp16.sh': 'train.py',
             'eval.py': 'eval.py', 'test.py': 'test.py'}

LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9_-]*')
CODE_SPAN = re.compile(r'`([^`\n]+)`')


def relative_links(path: Path) -> list[str]:
    """The link targets of a Markdown file that are neither web addresses nor e-mail."""
    return [target for target in LINK.findall(path.read_text())
            if not re.match(r'[a-z][a-z0-9+.-]*:', target)]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file (headings inside code blocks are not headings)."""
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith('```'):
            in_code = not in_code
        elif not in_code and (match := re.match(r'#{1,6} (.+)', line)):
            found.add(github_anchor(match.group(1)))
    return found


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(path):
    links = relative_links(path)
    broken = []
    for target in links:
        file, _, anchor = target.partition('#')
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f'{target} (no such file)')
        elif anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
            broken.append(f'{target} (no such heading)')
    assert not broken, f'{path.name}: broken links: {broken}'


def test_every_docs_page_is_linked_from_readme():
    linked = {(ROOT / target.partition('#')[0]).resolve() for target in relative_links(README)}
    assert set(DOCS[1:]) <= linked, f'not linked from README.md: {sorted(p.name for p in set(DOCS[1:]) - linked)}'


def test_readme_is_a_front_page():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f'README.md is {size} bytes; move reference text to docs/'


def command_lines(path: Path) -> list[tuple[str, str]]:
    """(heading, text) of the lines of code blocks and of the inline code spans: where commands and flags are
    written, with the heading of the section they are in."""
    lines, in_code, heading = [], False, ''
    for line in path.read_text().splitlines():
        if line.startswith('```'):
            in_code = not in_code
        elif in_code:
            lines.append((heading, line))
        elif match := re.match(r'#{1,6} (.+)', line):
            heading = match.group(1)
        else:
            lines.extend((heading, span) for span in CODE_SPAN.findall(line))
    return lines


def flags_named_for(script: str) -> set[str]:
    """Flags the documentation gives a script: on a command line, those after the script (up to a comment, pipe
    or `;`); in a code span or code line naming no script, those of a section whose heading names only it
    (`train.sh`'s section names torchrun's flags too: there only command lines count)."""
    flags = set()
    for path in DOCS:
        for heading, line in command_lines(path):
            line = re.split(r'\s#|\||;|&&', line)[0]
            words = line.split()
            named = [i for i, word in enumerate(words) if Path(word).name in PASSES_TO]
            if named:
                if PASSES_TO[Path(words[named[0]]).name] == script:
                    flags.update(FLAG.findall(' '.join(words[named[0] + 1:])))
            elif set(re.findall(r'[\w.]+\.py\b', heading)) == {script}:
                flags.update(FLAG.findall(line))
    return flags


# Runs `python SCRIPT --help` for each script in one interpreter, so that torch is imported once (seconds under
# load) instead of once per script: each script runs as __main__ with that argv, as python would run it.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for script in sys.argv[1:]:
    sys.argv, out = [script, '--help'], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name='__main__')
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    results[script] = [code, out.getvalue()]
from torch.distributed.run import get_args_parser
results['torchrun'] = [0, ' '.join(o for a in get_args_parser()._actions for o in a.option_strings)]
sys.stdout.write(json.dumps(results))
"""


@cache
def helps() -> dict[str, str]:
    """Each script's `--help` output (and torchrun's flags); a script whose --help does not exit 0 fails the test."""
    run = subprocess.run([sys.executable, '-c', HELP_RUNNER, *SCRIPTS], cwd=ROOT, text=True, capture_output=True,
                         timeout=300, env={**os.environ, 'PYTHONPATH': os.pathsep.join(
                             filter(None, (str(ROOT), os.environ.get('PYTHONPATH'))))})
    assert run.returncode == 0, f'--help runner failed: {run.stderr.strip()[-500:]}'
    results = json.loads(run.stdout)
    for script, (code, _) in results.items():
        assert code == 0, f'python {script} --help exited {code}: {run.stderr.strip()[-500:]}'
    return {script: output for script, (_, output) in results.items()}


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_runs(script):
    assert f'usage: {script}' in helps()[script]


@pytest.mark.parametrize('script', SCRIPTS)
def test_documented_flags_exist(script):
    named = flags_named_for(script)
    assert len(named) >= 2, f'found only {named} for {script}: the flag extraction no longer reads the docs'
    offered = set(FLAG.findall(helps()[script]))
    missing = sorted(named - offered)
    assert not missing, f'the docs name {missing} for {script}, which its --help does not offer'


def test_every_documented_flag_exists():
    """Flags the docs name without saying whose: each is a flag of a script here (their --help, or the argparse
    source of benchmarks/ and scripts/), of torchrun, or of tensorboard (`tensorboard --logdir output`)."""
    sources = ' '.join(path.read_text() for folder in ('benchmarks', 'scripts')
                       for path in (ROOT / folder).glob('*.py'))
    known = {*re.findall(r"add_argument\('(--[\w-]+)'", sources), *FLAG.findall(' '.join(helps().values())),
             '--logdir'}
    named = {flag for path in DOCS for flag in FLAG.findall(path.read_text())}
    assert not named - known, f'the docs name flags nothing here offers: {sorted(named - known)}'


def test_make_targets_exist():
    targets = set(re.findall(r'^([\w-]+):', (ROOT / 'Makefile').read_text(), flags=re.M))
    named = {target for path in DOCS for _, line in command_lines(path)
             for target in re.findall(r'(?:^|\s)make (\w+)', line)}
    assert named, 'no `make` command found in the docs'
    assert named <= targets, f'not Makefile targets: {sorted(named - targets)}'


def test_repository_map_names_existing_paths():
    """The map in README's "The repository" section: each entry's first word is a path (indented entries are
    inside the folder above)."""
    text = README.read_text()
    block = re.search(r'## The repository\n+```\n(.*?)```', text, flags=re.S)
    assert block, "README.md has no '## The repository' map"
    missing, folder = [], ROOT
    for line in block.group(1).splitlines():
        if not line.strip() or line.startswith(' ' * 4):  # empty, or a description's continuation
            continue
        entry = line.split()[0]
        base = folder if line.startswith('  ') else ROOT
        if not (base / entry).exists():
            missing.append(str((base / entry).relative_to(ROOT)))
        if not line.startswith('  ') and entry.endswith('/'):
            folder = ROOT / entry
    assert not missing, f'README.md maps paths that do not exist: {missing}'
