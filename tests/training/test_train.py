"""train.py end to end on the digits set: outputs, checkpoints, mixed precision, launchers and bad input."""
import json
import os
import stat
import subprocess
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from model.config import get_config
from model.modeling import VisionTransformer
from official_npz import make_official_weights
from train_helpers import ROOT, run_train, tiny_args
from utils import checkpoint as checkpoints
from utils.data_utils import digits_split
from utils.images import UnreadableImage, get_eval_transform
from utils.engine import Optimization, Precision, RunState, evaluate, optimizer_steps
from utils.errors import one_line
from utils.scheduler import lr_factor


def test_a_run_writes_checkpoints_results_and_tensorboard(tmp_path, capsys, monkeypatch):
    written, save_atomic = [], checkpoints.save_atomic

    def recording_save(state: dict, path: Path) -> None:
        written.append(path.name)
        save_atomic(state, path)

    monkeypatch.setattr(checkpoints, 'save_atomic', recording_save)
    results = train.main(tiny_args(tmp_path, 'run', '--augment', 'none'))
    run_dir = tmp_path / 'run'
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == results == json.loads((run_dir / 'results.json').read_text())
    for key in ('best_acc', 'final_acc', 'steps', 'seconds', 'peak_memory_mib'):
        assert key in results
    assert results['steps'] == 6 and 0 <= results['final_acc'] <= results['best_acc'] <= 1
    assert results['peak_memory_mib'] > 0

    checkpoint = torch.load(run_dir / 'last.ckpt', map_location='cpu', weights_only=True)
    assert checkpoint['step'] == 6 and checkpoint['best_acc'] == results['best_acc']
    for key in ('optimizer', 'scheduler', 'rng', 'epoch', 'epoch_step', 'config', 'args', 'class_names'):
        assert key in checkpoint
    assert checkpoint['class_names'] == [str(i) for i in range(10)]
    assert (run_dir / 'best.ckpt').is_file()
    assert not list(run_dir.glob('.*tmp*'))
    # best.ckpt before last.ckpt: a kill in between cannot leave a best_acc that no best.ckpt has.
    assert written[0] == 'best.ckpt' and written[-1] == 'last.ckpt'
    assert all(after == 'last.ckpt' for name, after in zip(written, written[1:]) if name == 'best.ckpt')

    # The saved weights are the model that scored final_acc: evaluate them independently.
    model = VisionTransformer(ml_collections.ConfigDict(checkpoint['config']), img_size=32, num_classes=10).eval()
    model.load_state_dict(checkpoint['state_dict'])
    images, labels = digits_split('val')
    transform = get_eval_transform(32)
    batch = torch.stack([transform(Image.fromarray(x, mode='L')) for x in images])
    with torch.no_grad():
        accuracy = (model(batch).argmax(-1).numpy() == labels).mean()
    assert accuracy == pytest.approx(results['final_acc'])

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'val/accuracy', 'train/images_per_second', 'train/peak_memory_mib'} <= tags
    assert {'routing/layer00_order0', 'routing/layer01_order1'} <= tags
    # The logged learning rate is the one the step used (the last step's is not yet 0 of the cosine's end).
    last_lr = events.Scalars('train/lr')[-1]
    assert last_lr.step == 6 and last_lr.value == pytest.approx(0.1 * lr_factor(5, 2, 6, 'cosine'))


def test_hard_routing_anneals_tau(tmp_path):
    train.main(tiny_args(tmp_path, 'hard', '--set', 'transformer.routing=hard', '--tau_policy', 'fast',
                         '--orders', '0,1,2'))
    events = EventAccumulator(str(tmp_path / 'hard'))
    events.Reload()
    taus = [event.value for event in events.Scalars('train/tau')]
    assert taus and taus[-1] == pytest.approx(0.1)
    assert 'routing/layer01_order2' in events.Tags()['scalars']


@pytest.mark.parametrize('flags', [
    ['--fp16', '--amp_dtype', 'bf16'],
    ['--fp16', '--fp16_opt_level', 'O1', '--loss_scale', '128'],
    ['--fp16', '--fp16_opt_level', 'O3', '--amp_dtype', 'bf16'],
    ['--fp16', '--fp16_opt_level', 'O0'],
])
def test_mixed_precision_levels_train(tmp_path, flags):
    results = train.main(tiny_args(tmp_path, 'amp', *flags, steps=3))
    assert results['steps'] == 3 and np.isfinite(results['final_acc'])
    state = torch.load(tmp_path / 'amp' / 'last.ckpt', weights_only=True)
    if '--loss_scale' in flags:
        assert state['scaler']['scale'] == 128.0
    expected = torch.bfloat16 if 'O3' in flags else torch.float32
    assert state['state_dict']['head.weight'].dtype == expected


def test_orders_and_set_override_the_config(tmp_path):
    args = train.get_args(tiny_args(tmp_path, 'x', '--orders', 'none', '--set', 'transformer.dropout_rate=0',
                                    '--set', 'hidden_size=48', '--set', 'transformer.pooling=fc',
                                    '--set', 'transformer.binarize=true', '--set', 'patches.size=8',
                                    '--set', 'representation_size=16'))
    config = train.build_config(args)
    assert config.transformer.orders == [] and config.transformer.dropout_rate == 0.0
    assert isinstance(config.transformer.dropout_rate, float)  # typed by the field, not by the text
    assert config.hidden_size == 48 and config.transformer.pooling == 'fc'
    assert config.transformer.binarize is True and config.patches.size == (8, 8)
    assert config.representation_size == 16
    args = train.get_args(tiny_args(tmp_path, 'x', '--set', 'transformer.orders=[0,3]',
                                    '--set', 'transformer.binarize=False'))
    config = train.build_config(args)
    assert config.transformer.orders == [0, 3] and config.transformer.binarize is False
    assert train.build_config(train.get_args(tiny_args(tmp_path, 'x', '--orders', '0,2'))).transformer.orders == [0, 2]
    assert get_config('testing').hidden_size == 32


@pytest.mark.parametrize('extra, message', [
    (['--set', 'transformer.heads=3'], 'no such config field'),
    (['--set', 'hidden_size=wide'], 'hidden_size=wide: expected an integer'),
    (['--set', 'transformer.binarize=maybe'], 'binarize=maybe: expected true or false'),
    (['--set', 'hidden_size'], "expected KEY=VALUE"),
    (['--orders', '0,one'], "orders '0,one': expected comma-separated integers"),
    (['--gradient_accumulation_steps', '3'], 'not divisible by 1 processes x 3'),
    (['--orders', '0,8'], 'order 8'),
    (['--set', 'patches=16'], r'--set patches=16: patches is a group of fields; expected one of patches\.size$'),
    (['--set', 'transformer.routing=hard', '--set', 'transformer.tau_min=0'],
     r'tau_min 0, transformer\.tau_max 10: expected 0 < tau_min <= tau_max for hard routing'),
    (['--set', 'transformer.routing=hard', '--set', 'transformer.tau_max=0.05'],
     r'tau_min 0\.1, transformer\.tau_max 0\.05: expected'),
])
def test_bad_settings_fail_with_one_clear_line(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(tiny_args(tmp_path, 'bad', *extra))


def test_warmup_must_be_shorter_than_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.get_args(tiny_args(tmp_path, 'x', '--warmup_steps', '6', steps=6))
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        'error: --warmup_steps 6: expected fewer than --num_steps 6')
    assert train.get_args(tiny_args(tmp_path, 'x', '--warmup_steps', '5', steps=6)).warmup_steps == 5


def test_local_rank_of_old_launchers_is_accepted_in_both_spellings():
    """torch.distributed.launch passes --local-rank (--local_rank before torch 2.0); torchrun sets LOCAL_RANK."""
    assert train.get_args(['--name', 'x', '--local-rank', '3']).local_rank == 3
    assert train.get_args(['--name', 'x', '--local_rank=2']).local_rank == 2


def test_validation_classes_must_be_the_training_classes(tmp_path):
    for split, names in (('train', ('cat', 'dog', 'fox')), ('val', ('cat', 'dog'))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new('RGB', (8, 8)).save(tmp_path / split / name / '0.png')
    expected = (f"{tmp_path / 'val'} has 2 classes and {tmp_path / 'train'} 3: expected the same class folders, "
                f"but 'fox' is only in {tmp_path / 'train'}")
    with pytest.raises(ValueError) as error:
        train.main(tiny_args(tmp_path, 'x', '--dataset', 'imagenet', '--data_dir', str(tmp_path), batch=3))
    assert str(error.value) == expected


def test_opt_levels_map_to_native_amp():
    cpu = torch.device('cpu')
    o0 = Precision.from_args(True, 'O0', 'fp16', 0, cpu)
    assert o0.dtype is None and o0.scaler is None and o0.model_dtype == torch.float32
    assert Precision.from_args(False, 'O2', 'fp16', 0, cpu).dtype is None  # --fp16 absent: float32
    dynamic = Precision.from_args(True, 'O1', 'fp16', 0, cpu)
    assert dynamic.dtype == torch.float16 and dynamic.scaler.get_scale() == 2.0 ** 16
    assert dynamic.scaler.get_growth_interval() == 2000
    static = Precision.from_args(True, 'O2', 'fp16', 256, cpu)
    assert static.scaler.get_scale() == 256
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = layer.weight.detach().clone()
    static.backward(layer(torch.tensor([[float('inf'), 1.0]])).sum())  # an overflowing step: skipped, scale kept
    static.step(optimizer, layer.parameters(), max_grad_norm=0)
    assert torch.equal(layer.weight, before) and static.scaler.get_scale() == 256
    for _ in range(3):  # good steps do not grow it either
        optimizer.zero_grad()
        static.backward(layer(torch.ones(1, 2)).sum())
        static.step(optimizer, layer.parameters(), max_grad_norm=0)
    assert static.scaler.get_scale() == 256 and not torch.equal(layer.weight, before)
    bf16 = Precision.from_args(True, 'O2', 'bf16', 0, cpu)
    assert bf16.dtype == torch.bfloat16 and bf16.scaler is None and not bf16.cast_model
    o3 = Precision.from_args(True, 'O3', 'fp16', 0, cpu)
    assert o3.cast_model and o3.model_dtype == torch.float16 and o3.scaler is None
    with torch.no_grad(), bf16.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16


def test_fine_tuning_starts_from_the_official_checkpoint_with_a_new_head(tmp_path):
    npz = make_official_weights(get_config('testing'), img_size=32, num_classes=21843)
    np.savez(tmp_path / 'testing.npz', **npz)
    train.main(tiny_args(tmp_path, 'ft', '--pretrained_dir', str(tmp_path / 'testing.npz'), '--learning_rate', '0',
                         steps=1))
    state = torch.load(tmp_path / 'ft' / 'last.ckpt', weights_only=True)['state_dict']  # lr 0: as loaded
    embeddings = 'transformer.embeddings.'
    assert torch.equal(state[embeddings + 'cls_token'], torch.from_numpy(npz['cls']))
    assert torch.equal(state[embeddings + 'position_embeddings'],
                       torch.from_numpy(npz['Transformer/posembed_input/pos_embedding']))
    assert torch.equal(state[embeddings + 'patch_embeddings.weight'],
                       torch.from_numpy(npz['embedding/kernel']).permute(3, 2, 0, 1))
    assert state['head.weight'].shape == (10, 32) and not state['head.weight'].any()  # zero_head for 10 digits


def test_missing_inputs_name_what_and_where(tmp_path):
    result = run_train(tiny_args(tmp_path, 'x', '--model_type', 'ViT-B_32',
                                 '--pretrained_dir', str(tmp_path / 'ViT-B_32.npz')))
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert str(tmp_path / 'ViT-B_32.npz') in result.stderr
    assert 'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_32.npz' in result.stderr
    with pytest.raises(FileNotFoundError, match='Google publishes none for testing'):
        train.main(tiny_args(tmp_path, 'x', '--pretrained_dir', 'missing.npz'))
    with pytest.raises(FileNotFoundError, match='train/<class>'):
        train.main(tiny_args(tmp_path, 'x', '--dataset', 'imagenet', '--data_dir', str(tmp_path / 'nowhere')))
    with pytest.raises(SystemExit):
        train.get_args(tiny_args(tmp_path, 'x', '--loss_scale', '3'))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r'at step \d+'):
        train.main(tiny_args(tmp_path, 'nan', '--learning_rate', '1e30', '--max_grad_norm', '0',
                             '--eval_every', '1', '--warmup_steps', '0', steps=20))
    checkpoint = torch.load(tmp_path / 'nan' / 'last.ckpt', weights_only=True)
    assert checkpoint['step'] >= 1
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values() if t.is_floating_point())


def test_resuming_with_another_model_is_refused(tmp_path):
    train.main(tiny_args(tmp_path, 'a', steps=3))
    named = r'another model: config\.transformer\.orders: checkpoint \[0, 1\] vs run \[0, 1, 2\]$'
    with pytest.raises(ValueError, match=named):
        train.main(tiny_args(tmp_path, 'b', '--orders', '0,1,2', '--resume_path', str(tmp_path / 'a' / 'last.ckpt')))
    (tmp_path / 'junk.ckpt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        train.main(tiny_args(tmp_path, 'c', '--resume_path', str(tmp_path / 'junk.ckpt')))


def test_unreadable_checkpoints_give_one_line(tmp_path):
    (tmp_path / 'empty.ckpt').write_bytes(b'')  # torch.load would raise EOFError('')
    with pytest.raises(ValueError, match=r'empty\.ckpt is empty \(0 bytes\)'):
        checkpoints.load(tmp_path / 'empty.ckpt')
    torch.save([1, 2], tmp_path / 'list.ckpt')
    with pytest.raises(ValueError, match=r'list\.ckpt holds a list, not a checkpoint dict$'):
        checkpoints.load(tmp_path / 'list.ckpt')
    torch.save({'w': torch.ones(1)}, tmp_path / 'bare.ckpt')
    with pytest.raises(ValueError, match=r"bare\.ckpt is not a checkpoint of this repository \(no 'state_dict'\)$"):
        checkpoints.load(tmp_path / 'bare.ckpt')
    with pytest.raises(FileNotFoundError, match='nowhere.ckpt does not exist'):
        checkpoints.load(tmp_path / 'nowhere.ckpt')


def test_one_line_gives_the_cause_of_an_error_from_a_data_loading_worker():
    from torch._utils import ExceptionWrapper  # how DataLoader re-raises a worker's error
    try:
        raise UnreadableImage('cannot read image /data/b.jpg: image file is truncated')
    except UnreadableImage:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(UnreadableImage) as error:
        wrapped.reraise()
    assert 'Traceback' in str(error.value)
    assert one_line(error.value) == 'cannot read image /data/b.jpg: image file is truncated'
    assert one_line(EOFError('')) == 'EOFError' and one_line(ValueError('first\nsecond')) == 'first'
    assert one_line(ValueError('x' * 400)) == 'x' * 300 + ' ...' and one_line(ValueError('x' * 400), None) == 'x' * 400


def test_resuming_a_finished_run_with_more_steps_warns_and_continues(tmp_path, capsys):
    train.main(tiny_args(tmp_path, 'short', steps=3))
    results = train.main(tiny_args(tmp_path, 'short', '--learning_rate', '0.2', '--resume_path',
                                   str(tmp_path / 'short' / 'last.ckpt'), steps=5))
    assert results['steps'] == 5
    assert "--num_steps 3 -> 5" in capsys.readouterr().err
    assert torch.load(tmp_path / 'short' / 'last.ckpt', weights_only=True)['step'] == 5


def test_atomic_save_keeps_the_old_checkpoint_when_a_write_dies(tmp_path, monkeypatch):
    path = tmp_path / 'last.ckpt'
    checkpoints.save_atomic({'state_dict': {'w': torch.ones(3)}, 'step': 1}, path)

    def dying_save(obj, file):
        file.write(b'half a checkpoint')
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_atomic({'state_dict': {'w': torch.zeros(3)}, 'step': 2}, path)
    assert checkpoints.load(path)['step'] == 1


def test_atomic_save_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append('folder' if stat.S_ISDIR(os.fstat(fd).st_mode) else 'file')
        fsync(fd)

    def recording_replace(source, target) -> None:
        events.append('rename')
        replace(source, target)

    monkeypatch.setattr(os, 'fsync', recording_fsync)
    monkeypatch.setattr(os, 'replace', recording_replace)
    checkpoints.save_atomic({'state_dict': {}, 'step': 1}, tmp_path / 'last.ckpt')
    assert events == ['file', 'rename', 'folder']
    assert checkpoints.load(tmp_path / 'last.ckpt')['step'] == 1


def test_corrupt_images_stop_the_run_or_are_skipped(tmp_path):
    data = tmp_path / 'data'
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for name in ('a', 'b'):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f'{i}.jpg')
    good = (data / 'train' / 'a' / '0.jpg').read_bytes()
    (data / 'train' / 'b' / 'truncated.jpg').write_bytes(good[:len(good) // 3])
    args = tiny_args(tmp_path, 'folder', '--dataset', 'imagenet', '--data_dir', str(data), '--num_workers', '1',
                     steps=2, batch=17)
    result = run_train(args)
    assert result.returncode != 0 and 'truncated.jpg' in result.stderr.strip().splitlines()[-1]
    result = run_train(args + ['--skip_corrupt'])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])['skipped_images'] >= 1


def test_a_micro_batch_of_only_skipped_files_adds_nothing():
    config = get_config('testing')
    config.transformer.dropout_rate = 0.0
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    empty = (torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), [10, 11, 12, 13])

    def one_step(batches, lr, accumulation):
        torch.manual_seed(0)
        model = VisionTransformer(config, img_size=32, num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        state = RunState()
        list(optimizer_steps(model, batches, Optimization(optimizer, scheduler, Precision('cpu'), accumulation), state))
        return model.state_dict(), state

    with_empty, state = one_step([(images, labels, []), empty], lr=0.1, accumulation=2)
    alone, _ = one_step([(images, labels, [])], lr=0.05, accumulation=1)  # the same update: loss / 2
    assert state.step == 1 and state.skipped_images == 4
    for key, value in alone.items():
        torch.testing.assert_close(with_empty[key], value, rtol=1e-5, atol=1e-7)


class NoEmptyBatches(torch.nn.Linear):
    """A linear classifier of flattened images that fails when run on a batch of no images."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert len(images), 'the model was run on an empty batch'
        return super().forward(images.flatten(1))


def test_evaluation_passes_over_a_batch_of_only_skipped_files():
    torch.manual_seed(0)
    model = NoEmptyBatches(3 * 2 * 2, 3)
    batch = (torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1]), 1)
    empty = (torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long), 4)
    evaluation = evaluate(model, [empty, batch, empty], Precision('cpu'))
    assert evaluation == evaluate(model, [batch], Precision('cpu')) and evaluation.images == 5
    with pytest.raises(ValueError, match='no readable images'):
        evaluate(model, [empty], Precision('cpu'))


def test_train_sh_runs_on_a_machine_without_gpus(tmp_path):
    env = {**os.environ, 'DATASET': 'digits', 'MODEL_TYPE': 'testing', 'IMG_SIZE': '32',
           'TRAIN_BATCH_SIZE': '16', 'EVAL_BATCH_SIZE': '90', 'NUM_STEPS': '2', 'WARMUP_STEPS': '1',
           'PRETRAINED_DIR': 'none', 'GPUS': '0', 'CUDA_VISIBLE_DEVICES': ''}
    for script, extra in (('train.sh', []), ('train_fp16.sh', ['--amp_dtype', 'bf16'])):
        result = subprocess.run(['bash', script, '--output_dir', str(tmp_path), '--num_workers', '0', *extra],
                                cwd=ROOT, env={**env, 'NAME': script}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1])['steps'] == 2
    args = json.loads(json.dumps(torch.load(tmp_path / 'train_fp16.sh' / 'last.ckpt', weights_only=True)['args']))
    assert args['fp16'] and args['fp16_opt_level'] == 'O2' and args['img_size'] == 32


def test_seed_flags_keep_their_names_and_defaults():
    """The original train.py's flags, with its defaults, still parse the same way."""
    args = vars(train.get_args(['--name', 'run']))
    seed_defaults = {
        'dataset': 'cifar10', 'model_type': 'ViT-B_16', 'pretrained_dir': 'checkpoint/ViT-B_16.npz',
        'output_dir': 'output', 'img_size': 224, 'train_batch_size': 512, 'eval_batch_size': 64, 'eval_every': 100,
        'learning_rate': 3e-2, 'weight_decay': 0, 'num_steps': 10000, 'decay_type': 'cosine', 'warmup_steps': 500,
        'max_grad_norm': 1.0, 'seed': 42, 'gradient_accumulation_steps': 1, 'fp16': False, 'fp16_opt_level': 'O2',
        'loss_scale': 0, 'resume_path': None, 'data_dir': './data', 'num_workers': 4,
    }
    assert {key: args[key] for key in seed_defaults} == seed_defaults


def test_gradients_are_clipped_to_max_grad_norm_before_the_optimizer_steps():
    """First SGD step (momentum buffer empty): the update is lr times the gradient clipped to max_grad_norm."""
    config = get_config('testing')
    config.transformer.dropout_rate = 0.0
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)

    def update(max_grad_norm: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = VisionTransformer(config, img_size=32, num_classes=10)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        optimization = Optimization(optimizer, scheduler, Precision('cpu'), max_grad_norm=max_grad_norm)
        list(optimizer_steps(model, [(images, labels, [])], optimization, RunState()))
        return before - torch.cat([p.detach().flatten() for p in model.parameters()])

    raw = update(0)
    assert raw.norm() > 0.01
    clipped = update(0.01)
    torch.testing.assert_close(clipped.norm(), torch.tensor(0.01), rtol=1e-4, atol=0)
    torch.testing.assert_close(clipped, raw * (0.01 / raw.norm()), rtol=1e-3, atol=2e-7)  # float32 weights near 1


def test_train_sh_starts_several_cpu_processes_and_resumes(tmp_path):
    env = {**os.environ, 'DATASET': 'digits', 'MODEL_TYPE': 'testing', 'IMG_SIZE': '32', 'NAME': 'two',
           'TRAIN_BATCH_SIZE': '16', 'EVAL_BATCH_SIZE': '90', 'NUM_STEPS': '2', 'WARMUP_STEPS': '1',
           'PRETRAINED_DIR': 'none', 'CUDA_VISIBLE_DEVICES': '', 'NPROC': '2'}
    command = ['bash', 'train.sh', '--output_dir', str(tmp_path), '--num_workers', '0']
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])['world_size'] == 2
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**env, 'NUM_STEPS': '3', 'RESUME_PATH': str(tmp_path / 'two' / 'last.ckpt')})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary['steps'] == 3 and summary['world_size'] == 2


def test_the_attention_flag_chooses_the_implementation_and_results_record_it(tmp_path):
    assert train.main(tiny_args(tmp_path, 'dense', '--attention', 'dense', steps=1))['attention'] == 'dense'
    assert torch.load(tmp_path / 'dense' / 'last.ckpt', weights_only=True)['config']['transformer']['attention'] == \
        'dense'
    with pytest.raises(ValueError, match='nope'):
        train.main(tiny_args(tmp_path, 'bad', '--attention', 'nope', steps=1))
    assert train.main(tiny_args(tmp_path, 'auto', steps=1))['attention'] == 'shared_scores'  # the CPU's choice
    assert train.main(tiny_args(tmp_path, 'plain', '--orders', 'none', steps=1))['attention'] is None


def test_a_run_resumes_with_another_attention_implementation(tmp_path):
    """The implementation says how routed attention is computed, not what the model is: resuming may change it."""
    train.main(tiny_args(tmp_path, 'a', '--attention', 'shared_scores', steps=2))
    resumed = train.main(tiny_args(tmp_path, 'b', '--attention', 'dense', '--resume_path',
                                   str(tmp_path / 'a' / 'last.ckpt'), steps=3))
    assert resumed['steps'] == 3 and resumed['attention'] == 'dense'
