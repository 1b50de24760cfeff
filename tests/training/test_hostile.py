"""Hostile inputs and faults: nothing is replaced unasked, no file changes labels or hangs a run, one line per error."""
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import train
from model.config import get_config, validate_config
from model.modeling import VisionTransformer
from train_helpers import ROOT, edited_checkpoint, run_train, tiny_args
from utils import checkpoint as checkpoints
from utils import folders
from utils.folders import scan_image_folder
from utils.images import UnreadableImage, read_image, to_rgb
from utils.errors import RunError
from utils.files import RunFolder, remove_stale_temporaries

ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}


def last_error_line(stderr: str) -> str:
    """The one line a failed command ends with; also checks that no traceback came before it."""
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert stderr.count('error: ') == 1, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def image_tree(root: Path, classes=('cat', 'dog'), per_class: int = 4, size: int = 8) -> Path:
    """A tiny ImageFolder split: `per_class` random PNGs per class folder."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f'{index}.png')
    return root


def dead_pid() -> int:
    """A process id that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


# ---------------------------------------------------------------------------------------------
# 1. Nothing is lost


def test_a_second_run_of_one_name_is_refused_and_overwrite_replaces_it_whole(tmp_path):
    train.main(tiny_args(tmp_path, 'run', steps=1))
    folder = tmp_path / 'run'
    before = {name: (folder / name).read_bytes() for name in ('best.ckpt', 'last.ckpt', 'results.json')}
    with pytest.raises(ValueError) as refused:
        train.main(tiny_args(tmp_path, 'run', '--seed', '1', steps=1))
    assert str(refused.value) == (
        f"run folder {folder} already holds a run (best.ckpt, last.ckpt, results.json): continue it with "
        f"--resume_path {folder / 'last.ckpt'}, choose another --name, or pass --overwrite to replace it")
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert len(list(folder.glob('events.out.tfevents.*'))) == 1

    train.main(tiny_args(tmp_path, 'run', '--seed', '1', '--overwrite', steps=1))
    assert (folder / 'last.ckpt').read_bytes() != before['last.ckpt']
    assert len(list(folder.glob('events.out.tfevents.*'))) == 1  # the old logs went with the old run
    assert torch.load(folder / 'last.ckpt', weights_only=True)['args']['seed'] == 1


def test_a_plain_second_train_sh_does_not_replace_the_first(tmp_path):
    env = {**ONE_THREAD, 'DATASET': 'digits', 'MODEL_TYPE': 'testing', 'IMG_SIZE': '32', 'TRAIN_BATCH_SIZE': '16',
           'NUM_STEPS': '1', 'WARMUP_STEPS': '0', 'PRETRAINED_DIR': 'none', 'CUDA_VISIBLE_DEVICES': ''}
    env.pop('NAME', None)
    (tmp_path / 'digits_vit_trar').mkdir()  # where `bash train.sh` puts a digits run: a first run's results
    (tmp_path / 'digits_vit_trar' / 'results.json').write_text('{"best_acc": 0.97}')
    results = (tmp_path / 'digits_vit_trar' / 'results.json').read_bytes()
    second = subprocess.run(['bash', 'train.sh', '--output_dir', str(tmp_path), '--num_workers', '0'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert 'already holds a run' in last_error_line(second.stderr)
    assert (tmp_path / 'digits_vit_trar' / 'results.json').read_bytes() == results


def test_one_folder_one_run_and_stale_temporary_files_are_cleaned(tmp_path):
    folder = tmp_path / 'locked'
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); f.write('4242'); "
        "f.flush(); print('held', flush=True); time.sleep(120)"), str(folder / '.lock')],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(ValueError, match=f'run folder {folder} is in use by process 4242: expected one run'):
            RunFolder(folder)
    finally:
        holder.kill()
        holder.wait()
    stale, live = folder / f'.trar-tmp.{dead_pid()}.last.ckpt', folder / f'.trar-tmp.{os.getpid()}.last.ckpt'
    # A user's files that look like temporaries of some tool, with or without a number: never this tool's.
    users = [folder / name for name in ('.draft.tmp', '.report.tmp.docx', '.best.ckpt.tmp', f'.last.{dead_pid()}.tmp')]
    for path in (stale, live, *users):
        path.write_bytes(b'half a checkpoint')
    run = RunFolder(folder)  # the lock died with its process
    assert not stale.exists() and live.exists()
    assert all(path.read_bytes() == b'half a checkpoint' for path in users)
    assert remove_stale_temporaries(folder) == []
    run.release()


def test_a_training_run_keeps_the_users_temporary_looking_files(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    users = {folder / '.draft.tmp': b'my draft', folder / '.report.tmp.docx': b'my report'}
    for path, content in users.items():
        path.write_bytes(content)
    train.main(tiny_args(tmp_path, 'run', steps=1))
    assert all(path.read_bytes() == content for path, content in users.items())
    assert not list(folder.glob('.trar-tmp.*'))  # and its own temporaries are gone


def test_overwrite_never_removes_a_folder_named_like_a_checkpoint(tmp_path):
    folder = tmp_path / 'run'
    (folder / 'best.ckpt').mkdir(parents=True)
    (folder / 'best.ckpt' / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match=rf"^run folder {re.escape(str(folder))} holds best\.ckpt that is not a "
                                         "file train.py wrote"):
        train.main(tiny_args(tmp_path, 'run', '--overwrite', steps=1))
    assert (folder / 'best.ckpt' / 'notes.txt').read_text() == 'mine'


def test_a_full_disk_stops_with_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    written = []

    def full_disk(state, file):
        file.write(b'the first bytes')
        written.append(Path(file.file.name))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(RunError) as error:
        train.main(tiny_args(tmp_path, 'full', steps=1))
    folder = tmp_path / 'full'
    assert re.fullmatch(rf"cannot write {re.escape(str(folder))}/(best|last)\.ckpt: No space left on device; "
                        "no checkpoint was written yet", str(error.value))
    assert written and not any(path.exists() for path in written)
    assert not (folder / 'best.ckpt').exists() and not (folder / 'last.ckpt').exists()


def test_a_write_refused_by_the_system_names_the_file_not_torchs_inner_position(tmp_path):
    """A real failed write (a file-size limit, as a full disk would): torch.save reports `unexpected pos`; the
    line names the file and the system's reason."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # the tiny model's checkpoint is larger

    failed = subprocess.run([sys.executable, 'train.py', *tiny_args(tmp_path, 'full', steps=1)], cwd=ROOT,
                            env=ONE_THREAD, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert failed.returncode == 1
    assert last_error_line(failed.stderr) == (f"train.py: error: cannot write {tmp_path / 'full' / 'best.ckpt'}: "
                                              "File too large; no checkpoint was written yet")
    assert not list((tmp_path / 'full').glob('*.ckpt')) and not list((tmp_path / 'full').glob('.trar-tmp.*'))


def test_the_output_folder_is_checked_before_the_data(tmp_path):
    (tmp_path / 'file').write_text('a file, not a folder')
    missing_data = ['--dataset', 'imagenet', '--data_dir', str(tmp_path / 'no_data')]
    with pytest.raises(ValueError, match=f"output folder {tmp_path / 'file'} is a file: expected a folder"):
        train.main(tiny_args(tmp_path / 'file', 'x', *missing_data))
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / 'read_only').mkdir(mode=0o500)
        with pytest.raises(ValueError, match='is not writable: Permission denied'):
            train.main(tiny_args(tmp_path / 'read_only', 'x', *missing_data))


# ---------------------------------------------------------------------------------------------
# 2 and 3. Data folders: no file changes the labels or hangs the run


def test_links_loops_hidden_and_special_files_never_change_the_samples(tmp_path):
    split = image_tree(tmp_path / 'train')
    expected = scan_image_folder(split)
    os.symlink('..', split / 'cat' / 'up')  # a loop through the split folder
    os.symlink('.', split / 'dog' / 'self')  # a loop onto itself
    os.symlink(split / 'cat' / '0.png', split / 'cat' / 'again.png')  # the same file twice in its class
    os.symlink(split / 'dog' / 'gone.png', split / 'dog' / 'dangling.png')
    (split / 'cat' / '._0.png').write_bytes(b'macOS resource fork')
    (split / '.hidden_class').mkdir()
    Image.new('RGB', (8, 8)).save(split / '.hidden_class' / 'a.png')
    os.mkfifo(split / 'dog' / 'pipe.png')  # opening it would block forever
    signal.alarm(20)  # fail instead of hanging
    try:
        folders, samples = scan_image_folder(split)
    finally:
        signal.alarm(0)
    assert folders == ['cat', 'dog']
    real = sorted((os.path.realpath(path), label) for path, label in samples)
    assert real == sorted((os.path.realpath(path), label) for path, label in expected[1])
    assert len(samples) == 8

    elsewhere = image_tree(tmp_path / 'pool', classes=('x',), per_class=1)
    os.symlink(elsewhere / 'x' / '0.png', split / 'cat' / 'linked.png')  # a link to a regular file elsewhere: read
    assert len(scan_image_folder(split)[1]) == 9
    os.symlink(split / 'cat' / '1.png', split / 'dog' / 'stolen.png')
    with pytest.raises(ValueError, match=r"stolen\.png is the file .*cat/1\.png of class 'cat' too: expected each"):
        scan_image_folder(split)


def test_test_py_reads_the_files_training_reads(tmp_path):
    """Hidden files and special files are skipped by both; a FIFO named as the image is refused, not opened."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    folder = image_tree(tmp_path / 'train', classes=('a',), per_class=2) / 'a'
    (folder / '._0.png').write_bytes(b'macOS resource fork')
    os.mkfifo(folder / 'pipe.png')
    trained = [path for path, _ in scan_image_folder(folder.parent)[1]]
    assert [str(path) for path in cli.image_paths(folder)] == trained
    with pytest.raises(cli.InputError, match=r'pipe\.png: not a regular file'):
        cli.read_image(folder / 'pipe.png')


def test_routing_plots_never_overwrite_an_input_or_each_other_and_are_checked_first(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    images = [tmp_path / name for name in ('a.jpg', 'a.png', 'b.png')]
    for image in images:
        Image.new('RGB', (8, 8)).save(image)
    plots = cli.plot_paths(str(tmp_path / 'out' / 'r.png'), images, str(tmp_path / 'model.ckpt'))
    assert {image.name: plot.name for image, plot in plots.items()} == {
        'a.jpg': 'r_a.jpg.png', 'a.png': 'r_a.png.png', 'b.png': 'r_b.png'}
    before = images[1].read_bytes()
    (tmp_path / 'file').write_text('not a folder')
    missing = tmp_path / 'missing.ckpt'  # the plot is refused before any model is loaded
    for plot, message in ((images[1], f'--routing_plot {images[1]} is an input of this run .*: it is never written '
                                      'over'),
                          (tmp_path / 'r.xyz', r"r\.xyz: expected a file name ending in .*\.png"),
                          (tmp_path / 'file' / 'r.png', f"{tmp_path / 'file'} is a file, not a folder")):
        status = cli.main(['--ckpt', str(missing), '--image', str(images[1]), '--routing_plot', str(plot)])
        err = capsys.readouterr().err.splitlines()
        assert status == 1 and len(err) == 1 and re.search(message, err[0]), err
    assert images[1].read_bytes() == before


def test_skipped_files_count_once_over_epochs_and_validation_too(tmp_path):
    data = tmp_path / 'data'
    image_tree(data / 'train', size=32)
    image_tree(data / 'val', per_class=2, size=32)
    (data / 'train' / 'cat' / 'broken.png').write_bytes(b'not a picture')
    (data / 'val' / 'dog' / 'broken.png').write_bytes(b'not a picture either')
    args = tiny_args(tmp_path, 'skip', '--dataset', 'imagenet', '--data_dir', str(data), '--skip_corrupt',
                     '--eval_every', '2', steps=6, batch=3)  # 3 steps an epoch: every file is read twice or more
    results = train.main(args)
    assert results['skipped_images'] == 2 and results['val_images'] == 4

    for path in (data / 'train').rglob('*.png'):
        path.write_bytes(b'unreadable')
    with pytest.raises(ValueError, match=r'step 1: no image of its global batch could be read'):
        train.main(tiny_args(tmp_path, 'none', '--dataset', 'imagenet', '--data_dir', str(data), '--skip_corrupt',
                             steps=2, batch=3))


@pytest.mark.parametrize('mode', ['F', 'I'])
def test_32_bit_images_keep_their_contrast(mode):
    """The image's own range becomes 0-255, as numpy computes it independently."""
    rng = np.random.default_rng(0)
    values = rng.uniform(0.2, 0.7, (6, 5)) if mode == 'F' else rng.integers(-70_000, 3_000_000, (6, 5))
    image = Image.fromarray(values.astype(np.float32 if mode == 'F' else np.int32), mode=mode)
    pixels = np.asarray(image, dtype=np.float64)
    expected = np.floor((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255 + 0.5).astype(np.uint8)
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (6, 5, 3) and (rgb == expected[..., None]).all()
    assert rgb.min() == 0 and rgb.max() == 255


def test_a_decompression_bomb_is_named_as_such(tmp_path, monkeypatch):
    Image.new('RGB', (10, 10)).save(tmp_path / 'huge.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10)
    with pytest.raises(UnreadableImage, match=r"huge\.png: it exceeds PIL's pixel limit Image\.MAX_IMAGE_PIXELS = 10"):
        read_image(tmp_path / 'huge.png')


def test_imagenet_names_need_the_real_imagenet_classes():
    wnids = folders.IMAGENET_WNIDS.read_text().split()
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids) and wnids[0] == 'n01440764'
    assert folders.imagenet_names(wnids)[0] == 'tench'
    assert folders.imagenet_names(wnids[:-1] + ['n99999999']) == wnids[:-1] + ['n99999999']


# ---------------------------------------------------------------------------------------------
# 4 and 5. Config values, checkpoints, precision flags: one clear line


@pytest.mark.parametrize('flags, message', [
    (['--learning_rate', 'nan'], '--learning_rate nan: expected a finite number'),
    (['--learning_rate', 'inf'], '--learning_rate inf: expected a finite number'),
    (['--weight_decay', 'nan'], '--weight_decay nan: expected a finite number'),  # a recipe flag
    (['--max_grad_norm', 'nan'], '--max_grad_norm nan: expected a finite number'),
    (['--loss_scale', 'nan'], '--loss_scale nan: expected a finite number'),
    (['--name', '../elsewhere'], "--name '../elsewhere': expected a folder name"),
    (['--name', 'a/b'], "--name 'a/b': expected a folder name"),
    (['--name', '..'], "--name '..': expected a folder name"),
    (['--name', ''], "--name '': expected a folder name"),
])
def test_non_finite_numbers_and_run_names_that_leave_the_output_folder_are_refused(tmp_path, capsys, flags, message):
    """NaN passes every range check (`x < 0` is false), so a NaN learning rate trained NaN weights with exit status 0;
    a run named '../x' wrote outside --output_dir, past the checks of that folder."""
    with pytest.raises(SystemExit) as stopped:
        train.get_args(tiny_args(tmp_path, 'run', *flags))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split(': error: ', 1)[1].startswith(message)
    assert not any(tmp_path.iterdir()) and not (tmp_path.parent / 'elsewhere').exists()


@pytest.mark.parametrize('assignment, message', [
    ('hidden_size=0', 'hidden_size 0: expected a positive integer'),
    ('transformer.num_layers=-2', 'transformer.num_layers -2: expected a positive integer'),
    ('transformer.mlp_dim=0', 'transformer.mlp_dim 0: expected a positive integer'),
    ('patches.size=0', r'patches.size \(0, 0\): expected two positive integers'),
    ('transformer.num_heads=3', 'transformer.num_heads 3: expected a divisor of hidden_size 32'),
    ('transformer.dropout_rate=nan', 'transformer.dropout_rate nan: expected a number in'),
    ('transformer.attention_dropout_rate=1', r'attention_dropout_rate 1\.0: expected a number in \[0, 1\)'),
    ('transformer.tau_max=inf', 'transformer.tau_max inf: expected a finite positive number'),
    ('transformer.tau_min=-1', 'transformer.tau_min -1.0: expected a finite positive number'),
    ('representation_size=0', 'representation_size 0: expected a positive integer'),
])
def test_invalid_config_values_are_named(tmp_path, assignment, message):
    with pytest.raises(ValueError, match=message):
        train.build_config(train.get_args(tiny_args(tmp_path, 'x', '--set', assignment)))


def test_the_model_checks_its_config_too():
    config = get_config('testing')
    config.transformer.num_heads = 5
    with pytest.raises(ValueError, match='num_heads 5: expected a divisor of hidden_size 32'):
        VisionTransformer(config, img_size=32)
    assert validate_config(get_config('ViT-B_16')).hidden_size == 768


def test_representation_size_adds_the_pre_logits_layer():
    """Dense + tanh between the CLS feature and the head (vit_jax's pre_logits), checked in float64 numpy."""
    config = get_config('testing')
    config.representation_size = 24
    torch.manual_seed(0)
    model = VisionTransformer(config, img_size=32, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x).double().numpy()
        feature = model.transformer(x)[0][:, 0].double().numpy()
    weights = {name: value.double().numpy() for name, value in model.state_dict().items()}
    hidden = np.tanh(feature @ weights['pre_logits.fc.weight'].T + weights['pre_logits.fc.bias'])
    np.testing.assert_allclose(logits, hidden @ weights['head.weight'].T + weights['head.bias'], rtol=1e-5, atol=1e-6)
    assert weights['head.weight'].shape == (7, 24)
    assert not any('pre_logits' in key for key in VisionTransformer(get_config('testing'), 32).state_dict())


def test_checkpoint_messages_say_what_is_wrong(tmp_path):
    (tmp_path / 'empty.ckpt').write_bytes(b'')
    with pytest.raises(ValueError, match=r'empty\.ckpt is empty \(0 bytes\): expected a checkpoint'):
        checkpoints.load(tmp_path / 'empty.ckpt')
    with pytest.raises(ValueError, match=f'checkpoint {tmp_path} is a folder: expected a checkpoint file'):
        checkpoints.load(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ('true',))

    torch.save({'state_dict': Payload()}, tmp_path / 'pickle.ckpt')
    with pytest.raises(ValueError) as refused:
        checkpoints.load(tmp_path / 'pickle.ckpt')
    message = str(refused.value)
    assert 'only arbitrary code could load, which is never done' in message and 'system' in message
    assert '\n' not in message

    torch.save({'state_dict': {}, 'step': 3}, tmp_path / 'edited.ckpt')  # a hand-edited checkpoint
    with pytest.raises(ValueError, match=r'edited\.ckpt lacks optimizer, scheduler, rng, .*: expected a last\.ckpt'):
        train.main(tiny_args(tmp_path, 'edited', '--resume_path', str(tmp_path / 'edited.ckpt')))


def test_precision_flags_that_would_do_nothing_or_run_slowly_are_said(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.get_args(tiny_args(tmp_path, 'x', '--amp_dtype', 'bf16'))
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        'error: --amp_dtype bf16 takes effect only with --fp16: expected --fp16 --amp_dtype bf16, or no '
        '--amp_dtype for float32')
    with pytest.raises(FileNotFoundError):  # the warning comes first, before the data is looked for
        train.main(tiny_args(tmp_path, 'cpu16', '--fp16', '--amp_dtype', 'bf16', '--dataset', 'imagenet',
                             '--data_dir', str(tmp_path / 'no_data')))
    assert 'warning: --fp16 on a CPU: autocast there runs slower than float32' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Processes: Ctrl-C and torchrun end with one line


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), process.communicate()[1][-3000:]


def test_ctrl_c_with_loader_workers_says_where_the_last_good_state_is(tmp_path):
    args = tiny_args(tmp_path, 'stop', '--num_workers', '2', '--eval_every', '2', steps=10_000)
    run = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=ONE_THREAD, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for(tmp_path / 'stop' / 'last.ckpt', run)
    os.killpg(run.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the process and its loader workers
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130
    line = last_error_line(stderr)
    last = tmp_path / 'stop' / 'last.ckpt'
    step = torch.load(last, weights_only=True)['step']
    assert line.startswith('train.py: error: interrupted at step ')
    assert line.endswith(f"{last} holds the last good state (step {step}): continue with --resume_path")


def test_under_torchrun_a_failure_and_ctrl_c_end_with_one_line(tmp_path):
    launcher = [sys.executable, '-m', 'utils.launch', '--standalone', '--nproc_per_node=2']
    torch.save({'state_dict': {}}, tmp_path / 'edited.ckpt')
    failed = run_train(tiny_args(tmp_path, 'bad', '--resume_path', str(tmp_path / 'edited.ckpt')),
                       launcher=launcher, env=ONE_THREAD)
    assert failed.returncode == 1
    assert last_error_line(failed.stderr) == (f"train.py: error: {tmp_path / 'edited.ckpt'} lacks optimizer, "
                                              "scheduler, rng, step, model_type, img_size, num_classes, config: "
                                              "expected a last.ckpt "
                                              "written by train.py")

    args = tiny_args(tmp_path, 'stop', '--eval_every', '2', steps=10_000)
    run = subprocess.Popen([*launcher, 'train.py', *args], cwd=ROOT, env=ONE_THREAD, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for(tmp_path / 'stop' / 'last.ckpt', run)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130
    line = last_error_line(stderr)
    assert line.startswith('train.py: error: interrupted at step ') and 'holds the last good state' in line


def test_a_process_under_torchrun_leaves_its_line_in_its_error_file_and_the_first_prints_it(tmp_path):
    """torchrun gives each process <attempt>/<local rank>/error.json. Every failing process leaves its message there;
    under plain torchrun only the attempt's first to fail prints it (whatever its rank), under utils/launch.py none."""
    def fail(rank: int, message: str, **env) -> subprocess.CompletedProcess:
        error_file = tmp_path / 'attempt_0' / str(rank) / 'error.json'
        error_file.parent.mkdir(parents=True, exist_ok=True)
        script = f"from utils.errors import exit_with; exit_with({message!r}, 7, 'x.py')"
        done = subprocess.run([sys.executable, '-c', script],
                              cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, 'TORCHELASTIC_ERROR_FILE': str(error_file), 'RANK': str(rank), **env})
        assert done.returncode == 7
        assert json.loads(error_file.read_text())['message']['message'] == message
        return done

    assert fail(1, 'bad value 3').stderr == 'x.py: error: bad value 3\n'  # rank 1 failed first: it prints
    assert fail(0, 'lost rank 1').stderr == ''  # a later failure of the attempt does not
    (tmp_path / 'attempt_0' / '.trar-reported').unlink()
    assert fail(0, 'bad value 4', TRAR_ONE_LINE_LAUNCHER='1').stderr == ''  # the launcher prints it
    for rank, printed in (('1', ''), ('0', 'x.py: error: bad value 5\n')):  # not torchrun's layout: rank 0 prints
        script = "from utils.errors import exit_with; exit_with('bad value 5', 7, 'x.py')"
        done = subprocess.run([sys.executable, '-c', script],
                              cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, 'TORCHELASTIC_ERROR_FILE': str(tmp_path / 'error.json'), 'RANK': rank})
        assert done.stderr == printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ['attempt_0', 'error.json']  # no mark beside a bare file


@pytest.mark.parametrize('failing', ['1', '01'])
def test_plain_torchrun_prints_the_first_failures_line_once_and_its_report_carries_it(tmp_path, failing):
    """Without utils/launch.py: the project's line once (from the first process to fail, rank 1 alone or both),
    then torchrun's own ChildFailedError report, whose `traceback :` field is that line's message."""
    script = tmp_path / 'fails.py'
    script.write_text(f"""import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from utils.errors import command_line
def main(argv):
    if os.environ['RANK'] in {failing!r}:
        raise ValueError('bad value on rank ' + os.environ['RANK'])
    time.sleep(60)  # stopped by torchrun once the other process has failed
command_line(main, 'fails.py')
""")
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    ours = [line for line in done.stderr.splitlines() if line.startswith('fails.py: error: ')]
    assert len(ours) == 1 and ours[0] in [f'fails.py: error: bad value on rank {rank}' for rank in failing], ours
    report = done.stderr.partition(ours[0])[2]
    assert 'ChildFailedError' in report and f'traceback : {ours[0].partition(": error: ")[2]}' in report


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A train.py checkpoint of one step: the testing config, orders [0, 1], 10 classes."""
    out = tmp_path_factory.mktemp('tiny')
    train.main(tiny_args(out, 'run', steps=1))
    return out / 'run' / 'last.ckpt'


def test_a_class_count_that_is_not_the_heads_is_one_line(tiny_checkpoint, tmp_path):
    """A hand-edited 'num_classes' (7) beside a head of 10 classes predicted with exit status 0."""
    from utils import inference
    edited = edited_checkpoint(tiny_checkpoint, tmp_path, lambda c: c.__setitem__('num_classes', 7))
    message = r"edited\.ckpt: its 'num_classes' is 7 but its head has 10; expected the same"
    with pytest.raises(ValueError, match=message):
        inference.load_model(edited)


@pytest.mark.parametrize('flags, message', [
    ({'orders': [0, 9]}, '--orders 0,9: {ckpt} is a train.py checkpoint, which carries its own config (orders 0,1)'),
    ({'orders': []}, '--orders none: {ckpt} is a train.py checkpoint'),
    ({'num_classes': 7}, '--num_classes 7: {ckpt} is a train.py checkpoint, which carries its own config '
                         '(num_classes 10)'),
    ({'model_type': 'demo'}, "--model_type demo: {ckpt} is a train.py checkpoint, which carries its own config "
                             "(model_type testing)"),
])
def test_flags_for_checkpoints_without_a_config_are_refused_for_one_with_its_own(tiny_checkpoint, flags, message):
    """test.py --orders 0,9 on a train.py checkpoint predicted with the checkpoint's orders, exit status 0: the flag
    was silently ignored. Its own values, given again, are no conflict."""
    from utils import inference
    with pytest.raises(ValueError) as refused:
        inference.load_model(tiny_checkpoint, **flags)
    assert str(refused.value).startswith(message.format(ckpt=tiny_checkpoint))
    model, _ = inference.load_model(tiny_checkpoint, 'testing', [0, 1], num_classes=10)
    assert list(model.config.transformer.orders) == [0, 1] and model.num_classes == 10


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.__setitem__('step', 'x'), "its 'step' is 'x'; expected the non-negative integer train.py writes"),
    (lambda c: c.__setitem__('step', -1), "its 'step' is -1; expected the non-negative integer"),
    (lambda c: c['state_dict'].__setitem__('head.weight', c['state_dict']['head.weight'] * float('nan')),
     'head.weight holds NaN or infinite values; expected finite weights'),
    (lambda c: c['state_dict'].__setitem__('head.weight', c['state_dict']['head.weight'].long()),
     'head.weight holds int64 values; expected floating-point weights'),
    (lambda c: c.__setitem__('state_dict', None), "its 'state_dict' is a NoneType"),
    (lambda c: c.__setitem__('config', 'hello'), "its 'config' is a str; expected the dict train.py writes"),
])
def test_a_hand_edited_checkpoint_to_resume_from_is_one_line_before_training(tiny_checkpoint, tmp_path, edit,
                                                                             message):
    """Resuming from NaN weights exited 0 with NaN weights saved; a string step failed mid-run in tqdm with a
    traceback. Both are refused when the checkpoint is read, naming the value."""
    edited = edited_checkpoint(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(ValueError) as refused:
        train.main(tiny_args(tmp_path, 'resumed', '--resume_path', str(edited), steps=3))
    assert str(refused.value) == f'{edited}: {message}' or str(refused.value).startswith(f'{edited}: {message}')
    assert not (tmp_path / 'resumed' / 'last.ckpt').exists()


@pytest.mark.parametrize('variable, value, message', [
    ('TRAR_CPU_KERNEL', 'yes', "TRAR_CPU_KERNEL 'yes': expected 0 (PyTorch ops) or 1"),
    ('TRAR_ATTENTION', 'shared_scoress', "TRAR_ATTENTION 'shared_scoress': expected one of "),
])
def test_an_environment_knob_checked_when_used_ends_test_py_with_one_line(tmp_path, capsys, monkeypatch, variable,
                                                                         value, message, tiny_checkpoint):
    """The knobs are read when the model first runs, inside test.py's prediction: their ValueError is one line
    `test.py: error: ...` through the tools' one exit, not a traceback."""
    import importlib.util

    from model.attention import shared_scores_cpu
    from utils.errors import command_line
    spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    image = tmp_path / 'digit.png'
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    monkeypatch.setenv(variable, value)
    shared_scores_cpu.kernel.cache_clear()  # the knob is read again
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as stopped:
            command_line(predict.main, 'test.py', ['--ckpt', str(tiny_checkpoint), '--image', str(image),
                                                   '--device', 'cpu'], expected=predict.EXPECTED)
    finally:
        monkeypatch.delenv(variable)
        shared_scores_cpu.kernel.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(err) == 1 and err[0].startswith(f'test.py: error: {message}'), err


def test_ctrl_c_during_a_checkpoint_write_stops_the_run_after_it():
    """The Ctrl-C handler defers an interrupt that comes while a checkpoint is written and recorded: the message
    then names that checkpoint, never "no checkpoint was written yet" beside a complete last.ckpt."""
    from utils.errors import interrupts_deferred, stop_at_first_interrupt

    previous = stop_at_first_interrupt()
    recorded = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)  # delivered here, at once, to this (the main) thread
                recorded.append('last.ckpt')  # the rest of the write still runs
        assert recorded == ['last.ckpt']
        with interrupts_deferred():  # a later block has no interrupt pending: later SIGINTs are ignored
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_whose_interrupt_python_ignored_still_stops_the_run(capsys):
    """A Ctrl-C landing where Python ignores exceptions (a callback of os.fork as a DataLoader starts its workers,
    here a __del__) is raised again at the next step, quietly: the run does not go on with Ctrl-C ignored."""
    from utils.errors import raise_lost_interrupt, stop_at_first_interrupt

    class Dying:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, and its KeyboardInterrupt is ignored

    previous, hook = stop_at_first_interrupt(), sys.unraisablehook
    try:
        raise_lost_interrupt()  # no Ctrl-C yet
        Dying()
        with pytest.raises(KeyboardInterrupt):
            raise_lost_interrupt()
        assert capsys.readouterr().err == ''  # no "Exception ignored" traceback
        stop_at_first_interrupt()  # a new run starts with no interrupt
        raise_lost_interrupt()
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook


def test_teardown_after_the_line_prints_nothing_under_it():
    """An object the failure left half-built (a DataLoader iterator interrupted in its constructor, whose __del__
    then fails) is torn down without an "Exception ignored" traceback under the one line."""
    script = ("from utils.errors import exit_with\n"
              "class HalfBuilt:\n"
              "    def __del__(self):\n"
              "        raise AttributeError(\"'HalfBuilt' object has no attribute '_workers'\")\n"
              "left = HalfBuilt()\n"
              "exit_with('interrupted at step 4', 130, 'x.py')\n")
    done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 130 and done.stderr == 'x.py: error: interrupted at step 4\n'
    without = subprocess.run([sys.executable, '-c', script.replace("exit_with('interrupted at step 4', 130, 'x.py')",
                                                                   "raise SystemExit(130)")],
                             cwd=ROOT, capture_output=True, text=True)
    assert 'Exception ignored' in without.stderr  # what the line would otherwise have under it


def test_the_launcher_reports_the_first_failure_and_rank_0s_interrupt(tmp_path):
    from utils.launch import first_message

    def leave(rank: int, message: str, status: int, timestamp: int) -> None:
        folder = tmp_path / 'run' / 'attempt_0' / str(rank)
        folder.mkdir(parents=True, exist_ok=True)
        info = {'timestamp': str(timestamp), 'exitcode': status, 'one_line': True}
        (folder / 'error.json').write_text(json.dumps({'message': {'message': message, 'extraInfo': info}}))

    assert first_message(tmp_path, 'train.py') is None
    leave(0, 'lost its peer', 1, 1002)
    leave(1, 'cannot read image b.png', 1, 1001)
    assert first_message(tmp_path, 'train.py') == ('train.py: error: cannot read image b.png', 1)
    for rank in (0, 1):
        leave(rank, f'interrupted on rank {rank}', 130, 1005 - rank)
    assert first_message(tmp_path, 'eval.py') == ('eval.py: error: interrupted on rank 0', 130)


def test_a_failure_of_one_process_under_train_sh_ends_with_its_line_only(tmp_path):
    """The unreadable validation image is in the second process's shard: that process reports it; the first,
    which loses its peer mid-collective, exits quietly (no gloo traceback), and the launcher prints one line."""
    data = tmp_path / 'data'
    image_tree(data / 'train', per_class=4)
    image_tree(data / 'val', per_class=2)  # cat/0 cat/1 dog/0 dog/1: index 1 is read by rank 1
    (data / 'val' / 'cat' / '1.png').write_bytes(b'not a picture')
    env = {**ONE_THREAD, 'DATASET': 'imagenet', 'DATA_DIR': str(data), 'MODEL_TYPE': 'testing', 'IMG_SIZE': '32',
           'NAME': 'two', 'TRAIN_BATCH_SIZE': '4', 'EVAL_BATCH_SIZE': '1', 'NUM_STEPS': '1', 'WARMUP_STEPS': '0',
           'PRETRAINED_DIR': 'none', 'CUDA_VISIBLE_DEVICES': '', 'NPROC': '2', 'PYTHON': sys.executable}
    failed = subprocess.run(['bash', 'train.sh', '--output_dir', str(tmp_path), '--num_workers', '0'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    line = last_error_line(failed.stderr)
    assert line.startswith('train.py: error: cannot read image ')
    assert line.count(str(data / 'val' / 'cat' / '1.png')) == 1
    assert 'Connection closed' not in failed.stderr and 'ChildFailedError' not in failed.stderr


def test_ctrl_c_while_train_py_imports_torch_ends_with_one_line(tmp_path):
    run = subprocess.Popen([sys.executable, 'train.py', *tiny_args(tmp_path, 'early')], cwd=ROOT, env=ONE_THREAD,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps = Path(f'/proc/{run.pid}/maps')
    deadline = time.time() + 120
    while run.poll() is None and time.time() < deadline and 'libtorch' not in maps.read_text():
        time.sleep(0.005)  # torch's libraries are being loaded: train.py is inside `import torch`
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130
    assert last_error_line(stderr) == ('train.py: error: interrupted before the first training step; this run wrote no '
                                       'checkpoint')
    assert not (tmp_path / 'early').exists()  # stopped before it made its run folder


@pytest.mark.parametrize('tool', ['train.py', 'eval.py', 'test.py', 'scripts/plot_curves.py', 'scripts/plot_routing.py',
                                  'scripts/make_pics.py', 'scripts/make_shards.py', 'benchmarks/bench.py',
                                  'benchmarks/loader.py'])
def test_a_machine_that_cannot_write_files_stops_each_tool_in_its_imports_with_one_line(tool):
    """Under a file-size limit of 0 (`ulimit -f 0`) torch's import finds no usable temporary folder and raises an
    OSError: the machine's problem, said in one line, not a traceback."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # noqa: E731
    env = {key: value for key, value in ONE_THREAD.items() if key != 'TORCHINDUCTOR_CACHE_DIR'}  # torch set it here
    failed = subprocess.run([sys.executable, tool, '--help'], cwd=ROOT, env=env, preexec_fn=limit,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and failed.stdout == ''
    assert last_error_line(failed.stderr).startswith(f"{Path(tool).name}: error: cannot start: [Errno 2] No usable "
                                                     "temporary directory found")


def test_ctrl_c_after_the_last_step_names_the_last_checkpoint(tmp_path, monkeypatch):
    """A Ctrl-C while the finished run writes its summary said "interrupted before the first training step; this run
    wrote no checkpoint": it is the run's interrupt, naming the checkpoint that holds every step."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'results_of', interrupted)
    with pytest.raises(RunError) as stopped:
        train.main(tiny_args(tmp_path, 'finished', steps=3))
    last = tmp_path / 'finished' / 'last.ckpt'
    assert stopped.value.code == 130 and str(stopped.value) == (
        f'interrupted at step 3; {last} holds the last good state (step 3): continue with --resume_path')
    assert torch.load(last, weights_only=True)['step'] == 3


def test_ctrl_c_while_a_finished_tool_exits_is_ignored():
    """The second or so a tool spends exiting (torch's and the loader workers' teardown, here a slow exit handler)
    comes after its result: a Ctrl-C there printed a KeyboardInterrupt traceback, or, late in Python's exit, killed
    the process without a word (status -2). It is ignored: the tool ends with its own status."""
    script = ("import atexit, sys, time\n"
              f"sys.path.insert(0, {str(ROOT)!r})\n"
              "from utils.errors import command_line, starting\n"
              "starting()\n"
              "def main(argv):\n"
              "    atexit.register(time.sleep, 3)\n"
              "    print('done', flush=True)\n"
              "command_line(main, 'late.py')\n")
    run = subprocess.Popen([sys.executable, '-c', script], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert run.stdout.readline() == 'done\n'
    time.sleep(1)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0 and out == '' and err == ''
