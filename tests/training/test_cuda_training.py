"""Training on a GPU: mixed-precision steps against float32, train.py end to end (fp16 O1/O2, bf16, --compile),
resuming, and test.py on CUDA. Skipped without a GPU; benchmarks/gpu_check.py runs them on one.

Tolerances: fp16 keeps 11 significant bits and bf16 8, so one autocast step's gradients differ from float32's by
about 2^-11 and 2^-8 relative per rounding, a few of which add up through the layers: the tests allow 1% (fp16)
and 5% (bf16) relative error in the gradient norm. CUDA's attention backward may sum in a different order from
run to run (atomic adds), so a resumed run is compared with an uninterrupted one within float32 rounding grown
over a few steps, not bit for bit as on the CPU.

Routed attention runs an implementation that compiles nothing with Inductor (`EAGER`; flex attention compiles
itself, 10 to 25 s per shape), except in the compiled run, which compiles the model with the device's default:
so benchmarks/gpu_check.py's few minutes hold the whole file.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from model.config import get_config
from model.modeling import VisionTransformer
from model.attention import use_implementation
from train_helpers import ROOT, tiny_args, weights
from utils import checkpoint as checkpoints
from utils.engine import Precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
CUDA = ['--device', 'cuda']
EAGER = 'triton' if importlib.util.find_spec('triton') is not None else 'dense'


@pytest.fixture(autouse=True)
def eager_attention():
    """Every test trains with `EAGER` routed attention unless it says otherwise."""
    with use_implementation(EAGER):
        yield


def one_step_gradients(precision: Precision) -> tuple[float, torch.Tensor]:
    """Loss and flattened true (unscaled) gradients of one training step of the `testing` model on CUDA."""
    torch.manual_seed(0)
    config = get_config('testing')
    config.transformer.dropout_rate = 0.0
    model = VisionTransformer(config, img_size=32, num_classes=10).cuda()
    images, labels = torch.randn(8, 3, 32, 32).cuda(), torch.arange(8).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with precision.autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    precision.backward(loss)
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize('amp_dtype, tolerance', [('fp16', 0.01), ('bf16', 0.05)])
def test_mixed_precision_step_matches_float32(amp_dtype, tolerance):
    """fp16 autocast with a GradScaler (loss scaled by 2^10, gradients unscaled) and bf16 autocast against float32.

    The scale is static: the dynamic one starts at 2^16, where a first step may overflow and be skipped."""
    device = torch.device('cuda')
    precision = Precision.from_args(True, 'O1', amp_dtype, 2 ** 10, device)
    assert (precision.scaler is not None) == (amp_dtype == 'fp16')
    loss, grads = one_step_gradients(precision)
    reference_loss, reference = one_step_gradients(Precision.from_args(False, 'O0', amp_dtype, 0, device))
    assert torch.isfinite(grads).all()
    assert loss == pytest.approx(reference_loss, rel=tolerance)
    assert (grads - reference).norm() <= tolerance * reference.norm()


@pytest.mark.parametrize('flags', [
    ['--fp16', '--fp16_opt_level', 'O1'],
    ['--fp16', '--fp16_opt_level', 'O2'],
    ['--fp16', '--amp_dtype', 'bf16'],
])
def test_train_py_trains_in_mixed_precision_on_cuda(tmp_path, flags):
    results = train.main(tiny_args(tmp_path, 'amp', *flags, *CUDA, steps=4))
    assert results['steps'] == 4 and 0 <= results['final_acc'] <= 1
    assert results['peak_memory_kind'] == 'cuda_max_allocated' and results['peak_memory_mib'] > 0
    state = torch.load(tmp_path / 'amp' / 'last.ckpt', weights_only=True)
    assert state['state_dict']['head.weight'].dtype == torch.float32  # float32 master weights
    assert all(torch.isfinite(t).all() for t in state['state_dict'].values() if t.is_floating_point())
    assert (state['scaler'] is not None) == ('bf16' not in flags)


def test_compiled_training_equals_eager_on_cuda(tmp_path):
    """train.py --compile (Inductor, the device's default routed attention) ends where eager training with the same
    implementation ends, within float32 rounding (dropout off)."""
    common = ('--set', 'transformer.dropout_rate=0', '--augment', 'none', '--eval_batch_size', '360', *CUDA)
    with use_implementation(None):
        eager = train.main(tiny_args(tmp_path, 'eager', *common, steps=3))
        compiled = train.main(tiny_args(tmp_path, 'compiled', *common, '--compile', steps=3))
    assert compiled['steps'] == eager['steps'] == 3
    expected, got = weights(tmp_path / 'eager' / 'last.ckpt'), weights(tmp_path / 'compiled' / 'last.ckpt')
    assert got.keys() == expected.keys()  # compiling in place keeps the state dict's keys
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resume_on_cuda_ends_where_the_uninterrupted_run_ends(tmp_path, monkeypatch):
    """The step-3 checkpoint of a 6-step run, resumed, ends within float32 rounding of the whole run (dropout and
    augmentation on: the CUDA random states are restored)."""
    save_atomic = checkpoints.save_atomic

    def keep_step_3(state: dict, path: Path) -> None:
        save_atomic(state, path)
        if path.name == 'last.ckpt' and state['step'] == 3:
            save_atomic(state, tmp_path / 'step3.ckpt')

    monkeypatch.setattr(checkpoints, 'save_atomic', keep_step_3)
    whole = train.main(tiny_args(tmp_path, 'whole', *CUDA))
    resumed = train.main(tiny_args(tmp_path, 'resumed', *CUDA, '--resume_path', str(tmp_path / 'step3.ckpt')))
    assert whole['steps'] == resumed['steps'] == 6
    expected, got = weights(tmp_path / 'whole' / 'last.ckpt'), weights(tmp_path / 'resumed' / 'last.ckpt')
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def predictions(checkpoint: Path, device: str) -> list[dict]:
    run = subprocess.run([sys.executable, 'test.py', '--ckpt', str(checkpoint), '--image', 'pic/', '--json',
                          '--device', device], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'TRAR_ATTENTION': EAGER if device == 'cuda' else ''})
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{')]


def test_test_py_on_cuda_predicts_what_the_cpu_predicts(tmp_path):
    train.main(tiny_args(tmp_path, 'run', *CUDA, steps=6))
    on_cuda, on_cpu = (predictions(tmp_path / 'run' / 'last.ckpt', device) for device in ('cuda', 'cpu'))
    assert [p['image'] for p in on_cuda] == [p['image'] for p in on_cpu] and len(on_cuda) == 11
    for gpu, cpu in zip(on_cuda, on_cpu):
        cpu_probabilities = {index: probability for index, _, probability in cpu['topk']}
        for index, _, probability in gpu['topk']:  # printed to 3 decimals
            if index in cpu_probabilities:
                assert probability == pytest.approx(cpu_probabilities[index], abs=2e-3), gpu['image']
        torch.testing.assert_close(torch.tensor(gpu['routing']), torch.tensor(cpu['routing']), rtol=0, atol=2e-3)
