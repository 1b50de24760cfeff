"""test.py: predictions on real image files, folders, JSON, train.py and official checkpoints, bad input."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from model.config import get_config
from model.modeling import VisionTransformer
from official_npz import make_official_weights, numpy_vit_logits
from train_helpers import edited_checkpoint
from utils.images import get_eval_transform

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location('predict_cli', ROOT / 'test.py')
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def run_cli(capsys, *args) -> tuple[int, list[str], list[str]]:
    """Run test.py in-process: (exit status, stdout lines, stderr lines)."""
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def digit_image(index: int, size: int = 32) -> np.ndarray:
    """A real handwritten digit from scikit-learn, as 8-bit grayscale of `size` pixels."""
    pixels = (load_digits().images[index] * (255 / 16)).round().astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.NEAREST))


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    """A checkpoint written by train.py: the testing config, a few steps on digits."""
    out = tmp_path_factory.mktemp('runs')
    subprocess.run([sys.executable, 'train.py', '--name', 'tiny', '--dataset', 'digits', '--model_type', 'testing',
                    '--img_size', '32', '--num_steps', '30', '--eval_every', '30', '--warmup_steps', '3',
                    '--train_batch_size', '32', '--eval_batch_size', '128', '--learning_rate', '0.1',
                    '--pretrained_dir', 'none', '--device', 'cpu', '--output_dir', str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return out / 'tiny' / 'last.ckpt'


def reference_probabilities(ckpt: Path, image_path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities and routing weights computed directly from the checkpoint and the eval transform."""
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    model = VisionTransformer(ml_collections.ConfigDict(checkpoint['config']), img_size=checkpoint['img_size'],
                              num_classes=checkpoint['num_classes'])
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    x = get_eval_transform(checkpoint['img_size'])(Image.open(image_path)).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    routing = model.routing_weights()
    return probs, None if routing is None else routing[:, 0]


def check_result(result: dict, probs: torch.Tensor, names: list[str], k: int = 5) -> None:
    expected = probs.topk(k)
    assert result['index'] == int(expected.indices[0])
    assert result['label'] == names[result['index']]
    assert [i for i, _, _ in result['topk']] == expected.indices.tolist()
    assert [label for _, label, _ in result['topk']] == [names[i] for i in expected.indices]
    np.testing.assert_allclose([p for _, _, p in result['topk']], expected.values.numpy(), atol=1e-5)


def save_formats(folder: Path, gray: np.ndarray) -> dict[str, Path]:
    """The same digit as files of several formats and modes; all but JPEG store it losslessly."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(gray)
    rgba = image.convert('RGBA')
    files = {
        'png_L': (image, 'digit_L.png'),
        'png_RGBA': (rgba, 'digit_RGBA.png'),
        'png_P': (image.convert('P'), 'digit_P.png'),
        'png_I16': (Image.fromarray(gray.astype(np.uint16) * 257), 'digit_I16.png'),
        'bmp_RGB': (image.convert('RGB'), 'digit.bmp'),
        'tiff_L': (image, 'digit.tiff'),
        'gif_P': (image.convert('P'), 'digit.gif'),
        'jpeg_RGB': (image.convert('RGB'), 'digit.jpg'),
        'webp_RGB': (image.convert('RGB'), 'digit.webp'),
    }
    paths = {}
    for key, (picture, name) in files.items():
        picture.save(folder / name, **({'lossless': True} if name.endswith('.webp') else {}))
        paths[key] = folder / name
    assert Image.open(paths['png_I16']).mode.startswith('I')
    assert Image.open(paths['png_P']).mode == 'P'
    return paths


def test_formats_and_modes_match_the_eval_transform(trained, tmp_path, capsys):
    paths = save_formats(tmp_path, digit_image(3))
    checkpoint = torch.load(trained, map_location='cpu', weights_only=True)
    lossless = reference_probabilities(trained, paths['png_L'])[0]
    for key, path in paths.items():
        status, out, err = run_cli(capsys, '--ckpt', trained, '--image', path, '--json')
        assert status == 0 and err == [], (key, err)
        result = json.loads(out[0])
        assert result['image'] == str(path)
        probs, _ = reference_probabilities(trained, path)
        check_result(result, probs, checkpoint['class_names'])
        if key != 'jpeg_RGB':  # every lossless file is the same picture, whatever its mode or bit depth
            torch.testing.assert_close(probs, lossless, atol=1e-5, rtol=0, msg=f"{key} differs from png_L")


def test_folder_text_lines_one_per_image(trained, tmp_path, capsys):
    for index in (0, 1, 2):
        Image.fromarray(digit_image(index)).save(tmp_path / f'digit_{index}.png')
    (tmp_path / 'notes.txt').write_text('not an image, and not listed')
    status, out, err = run_cli(capsys, '--ckpt', trained, '--image', tmp_path, '--topk', '3')
    assert status == 0 and err == []
    assert [line.split(':')[0] for line in out] == [str(tmp_path / f'digit_{i}.png') for i in (0, 1, 2)]
    names = torch.load(trained, map_location='cpu', weights_only=True)['class_names']
    for index, line in enumerate(out):
        probs, _ = reference_probabilities(trained, tmp_path / f'digit_{index}.png')
        top = probs.topk(3)
        predicted = int(top.indices[0])
        assert line.split(': ', 1)[1].startswith(f"{predicted} ({names[predicted]}) | top-3: ")
        assert line.endswith(f"{int(top.indices[2])} ({names[top.indices[2]]}) {float(top.values[2]):.3f}")


def test_json_reports_the_routing_weights_used(trained, tmp_path, capsys):
    path = tmp_path / 'digit.png'
    Image.fromarray(digit_image(7)).save(path)
    status, out, _ = run_cli(capsys, '--ckpt', trained, '--image', path, '--json', '--topk', '10')
    result = json.loads(out[0])
    probs, routing = reference_probabilities(trained, path)
    assert status == 0 and len(result['topk']) == 10
    names = torch.load(trained, map_location='cpu', weights_only=True)['class_names']
    check_result(result, probs, names, k=10)
    assert result['orders'] == get_config('testing').transformer.orders
    np.testing.assert_allclose(result['routing'], routing.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.sum(result['routing'], axis=1), 1.0, atol=1e-5)


def test_official_npz_matches_an_independent_numpy_vit(tmp_path, capsys):
    config = get_config('testing')
    weights = make_official_weights(config, img_size=32, num_classes=1000, seed=1)
    np.savez(tmp_path / 'ViT-testing.npz', **weights)
    image_path = tmp_path / 'digit.png'
    Image.fromarray(digit_image(5)).save(image_path)
    status, out, err = run_cli(capsys, '--ckpt', tmp_path / 'ViT-testing.npz', '--model_type', 'testing',
                               '--image', image_path, '--json')
    assert status == 0 and err == []
    x = get_eval_transform(32)(Image.open(image_path)).unsqueeze(0).numpy()
    logits = torch.from_numpy(numpy_vit_logits(weights, x, config.transformer.num_layers))[0]
    names = (ROOT / 'utils' / 'imagenet_classes.txt').read_text().splitlines()
    assert len(names) == 1000 and names[0] == 'tench'
    check_result(json.loads(out[0]), logits.softmax(-1).float(), names)


def test_dataset_class_names_offline(tmp_path, capsys, monkeypatch):
    """CIFAR-10's names need no data; CIFAR-100's do, and without them (offline) the error is one line."""
    def offline(*args, **kwargs):
        raise RuntimeError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    for name in ('CIFAR10', 'CIFAR100'):
        monkeypatch.setattr(f'torchvision.datasets.{name}', type(name, (), {'__init__': offline, 'url': name}))
    image = tmp_path / 'digit.png'
    Image.fromarray(digit_image(3)).save(image)
    for classes in (10, 100):
        np.savez(tmp_path / f'{classes}.npz', **make_official_weights(get_config('testing'), 32, classes))
    status, out, err = run_cli(capsys, '--ckpt', tmp_path / '10.npz', '--model_type', 'testing', '--image', image,
                               '--dataset', 'cifar10', '--data_dir', tmp_path, '--json', '--topk', '10')
    assert status == 0 and err == []
    assert sorted(label for _, label, _ in json.loads(out[0])['topk']) == [
        'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    status, out, err = run_cli(capsys, '--ckpt', tmp_path / '100.npz', '--model_type', 'testing', '--image', image,
                               '--dataset', 'cifar100', '--data_dir', tmp_path)
    assert status == 1 and out == [] and len(err) == 1
    assert err[0].startswith('test.py: error: cifar100 is not in ') and 'cifar-100-python' in err[0]


def test_dataset_names_for_a_checkpoint_that_carries_other_names_are_refused(trained, tmp_path, capsys):
    """A train.py checkpoint labels with its own class names; --dataset naming other classes is refused, not
    ignored, and --dataset naming the same ones is accepted."""
    image = tmp_path / 'digit.png'
    Image.fromarray(digit_image(3)).save(image)
    status, out, err = run_cli(capsys, '--ckpt', trained, '--image', image, '--dataset', 'cifar10')
    assert status == 1 and out == [] and err == [
        f"test.py: error: --dataset cifar10: {trained} is a train.py checkpoint, which carries its own class names "
        "(0, 1, 2, ...); expected no --dataset"]
    status, out, err = run_cli(capsys, '--ckpt', trained, '--image', image, '--dataset', 'digits', '--json')
    assert status == 0 and err == [] and json.loads(out[0])['label'] in [str(digit) for digit in range(10)]


def test_routing_plot_written_for_an_image_and_for_each_image_of_a_folder(trained, tmp_path, capsys):
    for index in (4, 6):
        Image.fromarray(digit_image(index)).save(tmp_path / f'digit_{index}.png')
    out = tmp_path / 'plots' / 'routing.png'
    status, _, err = run_cli(capsys, '--ckpt', trained, '--image', tmp_path / 'digit_4.png', '--routing_plot', out)
    assert status == 0 and err == []
    status, _, _ = run_cli(capsys, '--ckpt', trained, '--image', tmp_path, '--routing_plot', out)
    assert status == 0
    for path in (out, tmp_path / 'plots' / 'routing_digit_4.png', tmp_path / 'plots' / 'routing_digit_6.png'):
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        with Image.open(path) as picture:
            assert picture.width > 2 * picture.height > 600
            assert len(np.unique(np.asarray(picture.convert('L')))) > 50  # a drawing, not a blank page


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback.


def bad_inputs(folder: Path, trained: Path) -> dict[str, list]:
    png = folder / 'good.png'
    Image.fromarray(digit_image(0, size=256)).save(png)
    truncated_png, truncated_jpeg = folder / 'truncated.png', folder / 'truncated.jpg'
    Image.fromarray(digit_image(1, size=256)).save(folder / 'full.jpg', quality=95)
    truncated_png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    truncated_jpeg.write_bytes((folder / 'full.jpg').read_bytes()[:-400])
    (folder / 'text.png').write_text('hello, I am not a picture\n')
    (folder / 'garbage.ckpt').write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / 'empty.ckpt').write_bytes(b'')
    torch.save(torch.zeros(3), folder / 'tensor.ckpt')
    checkpoint = torch.load(trained, map_location='cpu', weights_only=True)
    wider = get_config('testing')
    wider.hidden_size = 48
    other = VisionTransformer(wider, img_size=32, num_classes=10)
    torch.save({**checkpoint, 'state_dict': other.state_dict()}, folder / 'other_shapes.ckpt')
    (folder / 'text.npz').write_text('not a zip archive')
    np.savez(folder / 'empty.npz', unrelated=np.zeros(3))
    image = ['--ckpt', trained, '--image']
    return {
        'missing image': image + [folder / 'nope.png'],
        'not an image': image + [folder / 'text.png'],
        'truncated png': image + [truncated_png],
        'truncated jpeg': image + [truncated_jpeg],
        'missing checkpoint': ['--ckpt', folder / 'nope.ckpt', '--image', png],
        'garbage checkpoint': ['--ckpt', folder / 'garbage.ckpt', '--image', png],
        'empty checkpoint': ['--ckpt', folder / 'empty.ckpt', '--image', png],
        'tensor checkpoint': ['--ckpt', folder / 'tensor.ckpt', '--image', png],
        'checkpoint of other shapes': ['--ckpt', folder / 'other_shapes.ckpt', '--image', png],
        'text npz': ['--ckpt', folder / 'text.npz', '--model_type', 'testing', '--image', png],
        'npz without ViT keys': ['--ckpt', folder / 'empty.npz', '--model_type', 'testing', '--image', png],
        'empty folder': image + [folder / 'empty'],
    }


def test_bad_inputs_give_one_line_and_nonzero_exit(trained, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    for case, args in bad_inputs(tmp_path, trained).items():
        status, out, err = run_cli(capsys, *args)
        assert status != 0, case
        assert out == [], case
        assert len(err) == 1 and err[0].startswith('test.py: error: '), (case, err)
        named = Path(args[args.index('--image') + 1] if case.endswith(('image', 'png', 'jpeg', 'folder'))
                     else args[1])
        assert named.name in err[0], (case, err)


def test_folder_with_a_bad_file_predicts_the_others_and_fails(trained, tmp_path, capsys):
    Image.fromarray(digit_image(0)).save(tmp_path / 'a.png')
    (tmp_path / 'b.png').write_text('not a picture')
    Image.fromarray(digit_image(2)).save(tmp_path / 'c.png')
    status, out, err = run_cli(capsys, '--ckpt', trained, '--image', tmp_path)
    assert status == 1
    assert [line.split(':')[0] for line in out] == [str(tmp_path / 'a.png'), str(tmp_path / 'c.png')]
    assert len(err) == 1 and 'b.png' in err[0]


def test_process_exit_status_and_stderr_without_traceback(trained, tmp_path):
    path = tmp_path / 'truncated.png'
    Image.fromarray(digit_image(9, size=256)).save(tmp_path / 'full.png')
    path.write_bytes((tmp_path / 'full.png').read_bytes()[:400])
    done = subprocess.run([sys.executable, 'test.py', '--ckpt', str(trained), '--image', str(path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ''
    assert done.stderr.count('\n') == 1 and 'Traceback' not in done.stderr and str(path) in done.stderr


@pytest.mark.parametrize('edit, expected', [
    (lambda c: c.update(class_names='abcdefghij'), "its 'class_names' is a str ('abcdefghij'); expected a list"),
    (lambda c: c.update(class_names=['zero', 'one']), 'it names 2 classes but its head has 10'),
    (lambda c: c.update(config='testing'), "its 'config' is a str; expected the dict train.py writes"),
    (lambda c: c['state_dict']['transformer.embeddings.cls_token'].fill_(float('nan')),
     'transformer.embeddings.cls_token holds NaN or infinite values; expected finite weights'),
    (lambda c: c['state_dict']['head.bias'].__setitem__(0, float('-inf')), 'head.bias holds NaN or infinite values'),
])
def test_hand_edited_or_non_finite_checkpoints_give_one_line_not_wrong_labels(trained, tmp_path, capsys, edit,
                                                                              expected):
    ckpt = edited_checkpoint(trained, tmp_path, edit)
    status, out, err = run_cli(capsys, '--ckpt', ckpt, '--image', ROOT / 'pic' / '1.jpg')
    assert status == 1 and out == [] and len(err) == 1 and err[0].startswith(f'test.py: error: {ckpt}: {expected}')


def test_an_image_size_beyond_memory_is_refused_before_anything_is_built(trained, capsys, monkeypatch):
    monkeypatch.setattr(cli.inference.pretrained, 'build_model', lambda *a: pytest.fail('built the model'))
    status, out, err = run_cli(capsys, '--ckpt', trained, '--image', ROOT / 'pic' / '1.jpg', '--img_size', 100000)
    assert status == 1 and out == [] and len(err) == 1
    assert err[0].startswith('test.py: error: --img_size 100000: 625000001 tokens need about ')
    assert err[0].endswith('GiB available; expected a smaller image size')


@pytest.mark.parametrize('name, expected', [
    ('routing.jpg', 'expected a file name ending in .pdf, .png or .svg'),
    ('digit_4.png', 'is an input of this run'),
    ('notes.png', 'exists and was not written by this project'),
    ('edited.ckpt', 'a checkpoint or weights file is never written over'),
])
def test_routing_plot_never_replaces_an_input_or_a_file_it_did_not_write(trained, tmp_path, capsys, name, expected):
    Image.fromarray(digit_image(4)).save(tmp_path / 'digit_4.png')
    (tmp_path / 'notes.png').write_bytes(b'my picture')
    kept = {path: path.read_bytes() for path in tmp_path.iterdir()}
    status, out, err = run_cli(capsys, '--ckpt', trained, '--image', tmp_path / 'digit_4.png',
                               '--routing_plot', tmp_path / name)
    assert status == 1 and out == [] and len(err) == 1 and expected in err[0], err
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == kept


@pytest.mark.parametrize('suffix', ['.png', '.pdf', '.svg'])
def test_routing_plot_it_wrote_it_may_write_again(trained, tmp_path, capsys, suffix):
    out = tmp_path / f'routing{suffix}'
    for _ in range(2):
        status, _, err = run_cli(capsys, '--ckpt', trained, '--image', ROOT / 'pic' / '1.jpg', '--routing_plot', out)
        assert status == 0 and err == []
    assert b'written by TRAR-ViT test.py' in out.read_bytes()
