"""Each recipe trains the demo's model end to end, resumes exactly after SIGKILL with every part on (EMA, mixup,
RandAugment on the loader workers, drop path, layer-decay groups) and evaluates, live and EMA weights."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from train_helpers import ROOT, killed_and_resumed, tiny_args

STEPS = 6
_spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
predict_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predict_cli)


@pytest.mark.parametrize('recipe,extra', [('deit', ['--layer_decay', '0.75']), ('mae', ['--orders', 'none'])])
def test_recipe_trains_resumes_exactly_after_sigkill_and_evaluates(tmp_path, capsys, recipe, extra):
    # tiny_args' SGD lr is too high for AdamW; a short run needs an EMA that moves
    flags = ['--recipe', recipe, *extra, '--learning_rate', '1e-3', '--model_ema_decay', '0.9']
    args = tiny_args(tmp_path, 'killed', *flags, '--num_workers', '2', steps=STEPS)  # augmented in the workers
    resumed, _, checkpoint, whole = killed_and_resumed(tmp_path, tiny_args(tmp_path, 'whole', *flags, steps=STEPS),
                                                       args, STEPS)
    final, expected = torch.load(checkpoint, weights_only=True), torch.load(whole, weights_only=True)
    assert final['step'] == STEPS
    for key, value in expected['state_dict'].items():
        assert torch.equal(final['state_dict'][key], value), key
    assert (final['ema_state_dict'] is None) == (recipe == 'mae')
    if recipe == 'deit':
        for key, value in expected['ema_state_dict'].items():
            assert torch.equal(final['ema_state_dict'][key], value), key
        assert any(not torch.equal(final['ema_state_dict'][key], value) for key, value in final['state_dict'].items()
                   if value.is_floating_point())  # an average, not a copy
        assert len(final['optimizer']['param_groups']) > 2  # layer decay's groups, restored
    results = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert results['recipe']['name'] == recipe and results['recipe']['model_ema_decay'] == 0.9
    assert 'model_ema_decay' in results['recipe']['overridden']
    assert ('ema_final_acc' in results) == (recipe == 'deit')
    assert 'overridden: ' in resumed.stdout and 'model_ema_decay' in resumed.stdout.split('overridden: ')[1]

    for use_ema in ([False, True] if recipe == 'deit' else [False]):
        out = tmp_path / f'eval-{use_ema}.json'
        evaluation = subprocess.run([sys.executable, 'eval.py', '--ckpt', str(checkpoint), '--dataset', 'digits',
                                     '--num_workers', '0', '--device', 'cpu', '--output_json', str(out),
                                     *(['--use_ema'] if use_ema else [])],
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert evaluation.returncode == 0, evaluation.stderr[-2000:]
        summary = json.loads(out.read_text())
        assert summary['ema'] is use_ema and summary['images'] == results['val_images']
        assert summary['top1'] == pytest.approx(results['ema_final_acc' if use_ema else 'final_acc'])
    if recipe == 'deit':  # test.py predicts with either set of weights
        predictions = []
        for use_ema in (False, True):
            status = predict_cli.main(['--ckpt', str(checkpoint), '--image', str(ROOT / 'pic' / 'digit_3.png'),
                                       '--json', *(['--use_ema'] if use_ema else [])])
            assert status == 0
            predictions.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert predictions[0] != predictions[1]  # the average's probabilities, not the live weights'
    if recipe == 'mae':  # no average to evaluate
        evaluation = subprocess.run([sys.executable, 'eval.py', '--ckpt', str(checkpoint), '--dataset', 'digits',
                                     '--device', 'cpu', '--use_ema'], cwd=ROOT, capture_output=True, text=True,
                                    timeout=300)
        assert evaluation.returncode != 0 and evaluation.stderr.strip().splitlines() == [
            f"eval.py: error: {checkpoint} holds no EMA weights: expected a train.py checkpoint of a run with "
            "--model_ema"]


@pytest.mark.parametrize('flags,message', [
    (['--recipe', 'deit', '--train_batch_size', '1'], 'micro-batches of 1 images'),
    (['--recipe', 'mae', '--aa', 'rand-q3'], "--aa 'rand-q3': not an auto-augment string timm knows"),
    (['--reprob', '-0.5'], '--reprob -0.5: expected a probability in [0, 1]'),
])
def test_bad_recipe_values_stop_train_py_with_one_line(tmp_path, capsys, flags, message):
    import train
    with pytest.raises((SystemExit, ValueError)) as stopped:
        train.main(tiny_args(tmp_path, 'bad', *flags, steps=2))
    said = str(stopped.value) if stopped.type is ValueError else capsys.readouterr().err.splitlines()[-1]
    assert message in said and '\n' not in said
    assert not (tmp_path / 'bad').exists()  # stopped before the run folder was made
