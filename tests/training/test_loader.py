"""The uint8 input pipeline against the float32 torchvision pipeline it replaces (and timm's evaluation
transform): the same evaluation pixels, the same training crops and flips, normalisation moved to the device."""
import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms
from torchvision.transforms import functional as TF

from utils.data_utils import Augmented, DeviceBatches, collate_skipping_none, load_split
from utils.images import (Preprocess, Skipped, TrainPixels, UnreadableImage, decode, eval_pixels, get_eval_transform,
                          jpeg_pixels, normalize, open_image, read_image, to_rgb, train_pixels, transformed)

PHOTO = Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg'  # a real 512 x 600 JPEG


def float32_pipeline(steps: list, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> transforms.Compose:
    """torchvision's float32 pipeline on fully decoded PIL images, as the loader workers ran it before."""
    return transforms.Compose([transforms.Lambda(to_rgb), *steps, transforms.ToTensor(),
                               transforms.Normalize(mean=mean, std=std)])


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=quality)
    return buffer.getvalue()


def test_evaluation_pixels_are_torchvisions_and_timms_exactly(tmp_path):
    photo = read_image(PHOTO)
    gray = photo.convert('L').resize((97, 61))
    gray.save(tmp_path / 'gray.png')
    files = [PHOTO, tmp_path / 'gray.png']
    reference = float32_pipeline([transforms.Resize((32, 32))])
    for path in files:
        pixels = eval_pixels(32)(open_image(path))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        assert torch.equal(normalize(pixels, Preprocess()), reference(read_image(path)))
        assert torch.equal(get_eval_transform(32)(open_image(path)), reference(read_image(path)))
    deit = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation='bicubic', crop_pct=0.9)
    timm_eval = create_transform(32, is_training=False, interpolation='bicubic', crop_pct=0.9, mean=deit.mean,
                                 std=deit.std)
    for path in files:
        ours = normalize(eval_pixels(32, deit)(open_image(path)), deit)
        assert torch.equal(ours, timm_eval(to_rgb(read_image(path))))


def crop_and_flip(image: Image.Image, seed: int, scale=(0.05, 1.0)) -> tuple[tuple[int, int, int, int], bool]:
    """torchvision's RandomResizedCrop box and RandomHorizontalFlip decision for a seed, drawn as they draw."""
    torch.manual_seed(seed)
    box = transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
    return box, bool(torch.rand(1) < 0.5)


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_training_crops_and_flips_are_torchvisions_for_the_same_seeds(interpolation):
    """Each seed gets torchvision's crop box and flip. A JPEG crop resized on the tensor (decoded at full size)
    is torchvision's PIL resize up to rounding: most pixels equal, the rest a few levels off; one decoded at
    reduced size is torchvision's up to resampling. Neither is the mirror image."""
    data = PHOTO.read_bytes()
    full = read_image(PHOTO)
    size = 200  # crops of 400+ pixels each way are decoded at 1/2 size
    preprocess = Preprocess(interpolation=interpolation)
    reference = transforms.Compose([transforms.RandomResizedCrop((size, size), scale=(0.05, 1.0),
                                                                 interpolation=preprocess.resample),
                                    transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    ours = train_pixels(size, 'flip', preprocess)
    reduced, tensor_resized, flips = 0, 0, 0
    for seed in range(40):
        (top, left, height, width), flip = crop_and_flip(full, seed)
        torch.manual_seed(seed)
        expected = reference(full).float()
        torch.manual_seed(seed)
        pixels = ours(open_image(io.BytesIO(data), 'photo'))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, size, size)
        got = pixels.float()
        flips += flip
        error, mirrored = (got - expected).abs().mean(), (got - expected.flip(-1)).abs().mean()
        if ours.reduction(width, height) == 1:
            tensor_resized += 1
            assert (got == expected).float().mean() > 0.8 and error < 0.5 and error < mirrored / 10, (seed, error)
            assert (got - expected).abs().max() <= (2 if interpolation == 'bilinear' else 16), seed
            continue
        reduced += 1
        assert error < 6 and error < mirrored / 2, (seed, error, mirrored)
    assert reduced >= 8 and tensor_resized >= 8 and 10 <= flips <= 30


def test_a_batch_makes_its_draws_first_and_gives_each_sample_what_it_gives_alone(tmp_path):
    """`Augmented.__getitems__` (what a DataLoader calls) plans every sample of a batch, then decodes them: the same
    pixels, labels and skipped entries as `transformed` one sample at a time, with JPEGs on either decode path, a
    PNG, a file PIL cannot open and a JPEG that fails in its decode, in any order and with repeats."""
    photo = read_image(PHOTO)
    for i, size in enumerate([(500, 375), (375, 500), (1200, 900), (300, 200)]):
        folder = tmp_path / 'train' / f'c{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{i}.jpg').write_bytes(jpeg(photo.resize(size)))
    photo.resize((64, 48)).save(tmp_path / 'train' / 'c0' / 'png.png')
    (tmp_path / 'train' / 'c0' / 'text.jpg').write_text('not an image')
    (tmp_path / 'train' / 'c1' / 'cut.jpg').write_bytes(jpeg(photo.resize((300, 200)))[:-3000])
    source = load_split('imagenet', str(tmp_path), train=True, skip_corrupt=True)
    assert len(source) == 7
    transform = train_pixels(224, 'flip')
    dataset = Augmented(source, transform, seed=3)
    dataset.set_epoch(2)
    for indices in ([0, 1, 2, 3, 4, 5, 6], [6, 2, 5, 2, 0, 4, 1, 3]):
        alone = [transformed(lambda i=i: source.load(i), transform, (3, 2, i), i, skip_corrupt=True)
                 for i in indices]
        batch = dataset.__getitems__(indices)
        assert [item for item in batch if isinstance(item, Skipped)] == \
               [item for item in alone if isinstance(item, Skipped)] and len(batch) == len(indices)
        assert {source.samples[item.index][0].split('/')[-1] for item in batch if isinstance(item, Skipped)} == \
               {'text.jpg', 'cut.jpg'}
        for got, want in zip(batch, alone):
            if not isinstance(want, Skipped):
                assert torch.equal(got[0], want[0]) and got[1] == want[1]
    source.skip_corrupt = False
    names = [path.split('/')[-1] for path, _ in source.samples]
    with pytest.raises(UnreadableImage, match=r'text\.jpg: not an image format .*\(use --skip_corrupt'):
        dataset.__getitems__(list(range(7)))  # it fails in its planning, before any decode
    with pytest.raises(UnreadableImage, match=r'cut\.jpg: damaged or truncated .*\(use --skip_corrupt'):
        dataset.__getitems__([i for i, name in enumerate(names) if name != 'text.jpg'])


def test_jpeg_pixels_are_pils_decode_and_other_formats_are_left_to_pil(tmp_path):
    photo = read_image(PHOTO)
    for image in (photo, photo.convert('L')):
        image.save(tmp_path / 'photo.jpg', quality=90)
        pixels = jpeg_pixels(open_image(tmp_path / 'photo.jpg'))
        assert torch.equal(pixels, TF.pil_to_tensor(to_rgb(read_image(tmp_path / 'photo.jpg'))))
    photo.save(tmp_path / 'photo.png')
    assert jpeg_pixels(open_image(tmp_path / 'photo.png')) is None
    truncated = jpeg(photo)[:5000]
    with pytest.raises(UnreadableImage, match=r'cannot read image cut\.jpg: damaged or truncated'):
        jpeg_pixels(open_image(io.BytesIO(truncated), 'cut.jpg'))


def test_a_reduced_decode_needs_the_output_size_each_way():
    pixels = TrainPixels(100, (0.05, 1.0), flip=True)
    assert [pixels.reduction(w, h) for w, h in ((99, 800), (199, 800), (200, 200), (400, 420), (800, 900))] == \
        [1, 1, 2, 4, 8]
    image = open_image(io.BytesIO(jpeg(read_image(PHOTO))), 'photo')
    assert decode(image, draft=(512 // 4, 600 // 4)).size == (128, 150)  # PIL's DCT scaling, 1/4


def test_training_augmentation_distribution_matches_torchvision_on_tiny_images():
    """On images too small for a reduced decode (digits), every augmented image is torchvision's exactly."""
    source = load_split('digits', '', train=True)
    for augment, steps in (('flip', [transforms.RandomResizedCrop((16, 16), scale=(0.05, 1.0)),
                                     transforms.RandomHorizontalFlip()]),
                           ('crop', [transforms.RandomResizedCrop((16, 16), scale=(0.5, 1.0))])):
        ours = Augmented(source, train_pixels(16, augment), seed=5)
        reference = Augmented(source, float32_pipeline(steps), seed=5)
        for index in range(0, 200, 7):
            assert torch.equal(normalize(ours[index][0], Preprocess()), reference[index][0])


def test_batches_are_uint8_and_normalised_on_their_device():
    dataset = Augmented(load_split('digits', '', train=False), eval_pixels(8), seed=0)
    batch = collate_skipping_none([dataset[i] for i in range(4)])
    assert batch[0].dtype == torch.uint8
    images, labels, skipped = next(iter(DeviceBatches([batch], torch.device('meta'))))
    assert images.device.type == 'meta' and images.dtype == torch.float32 and labels.device.type == 'meta'
    (cpu_images, _, _), = DeviceBatches([batch], torch.device('cpu'), Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3))
    assert torch.equal(cpu_images, batch[0].double().div(255).float())


@pytest.mark.parametrize('fields, message', [
    (dict(interpolation='nearest'), "interpolation 'nearest': expected one of"),
    (dict(crop_pct=1.5), 'crop_pct 1.5: expected a number in'),
    (dict(std=(0.5, 0.0, 0.5)), 'std positive'),
])
def test_preprocess_refuses_bad_values_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**fields)
    assert Preprocess(mean=[0.5, 0.5, 0.5]) == Preprocess()  # lists become the tuples of a hashable config


def test_an_unreadable_jpeg_is_named_at_decode():
    data = jpeg(read_image(PHOTO))
    image = open_image(io.BytesIO(data[:len(data) // 3]), 'shard-0.tar:photo.jpg')
    with pytest.raises(Exception, match=r'cannot read image shard-0\.tar:photo\.jpg: damaged or truncated'):
        train_pixels(32, 'flip')(image)
    assert np.asarray(decode(open_image(PHOTO))).shape == (600, 512, 3)
