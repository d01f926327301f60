"""Image pipeline: torchvision-exact pixels, the paper's subset, tfds, cache, hosts, bad input."""

import io
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import skimage.data

import optional
from lc_jax import data
from lc_jax.data import loader
from lc_jax.data import subset
from lc_jax.errors import UserError

# Files that are not images, left in class folders: torchvision ignores them, and so do we.
NOT_IMAGES = ('a_photos/notes.txt', 'b_made/Thumbs.db')


def _save(image, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """An ImageFolder of real photos in the modes, formats and shapes that ImageNet val holds."""
  root = str(tmp_path_factory.mktemp('imagefolder'))
  photos = os.path.join(root, 'a_photos')
  os.makedirs(photos)
  for name in ('rocket.jpg', 'hubble_deep_field.jpg', 'chelsea.png', 'coffee.png', 'camera.png'):
    # As shipped: camera JPEGs, RGB and grayscale PNGs; one extension in capitals, as ImageNet's.
    target = name.replace('rocket.jpg', 'rocket.JPEG')
    shutil.copy(os.path.join(data.sources.photo_dir(), name), os.path.join(photos, target))
  chelsea = Image.fromarray(skimage.data.chelsea())
  astronaut = Image.fromarray(skimage.data.astronaut())
  _save(astronaut, f'{photos}/astronaut.jpg', quality=90)
  made = os.path.join(root, 'b_made')
  _save(chelsea.convert('CMYK'), f'{made}/cmyk.jpg', quality=85)
  _save(chelsea.convert('L'), f'{made}/gray.jpg')
  _save(astronaut.convert('P', palette=Image.Palette.ADAPTIVE), f'{made}/palette.png')
  transparent = chelsea.convert('P', palette=Image.Palette.ADAPTIVE, colors=64)
  _save(transparent, f'{made}/palette_transparent.png', transparency=0)
  rgba = astronaut.copy()
  rgba.putalpha(Image.linear_gradient('L').resize(astronaut.size))
  _save(rgba, f'{made}/rgba.png')
  _save(chelsea.convert('LA'), f'{made}/gray_alpha.png')
  deep = skimage.data.camera().astype(np.uint16) * 257
  _save(Image.fromarray(deep), f'{made}/gray16.png')
  _save(chelsea.resize((300, 257)), f'{made}/odd_300x257.jpg')
  _save(astronaut.resize((257, 400)), f'{made}/portrait_257x400.jpg')
  _save(chelsea.resize((50, 37)), f'{made}/tiny_50x37.png')
  _save(astronaut.resize((224, 224)), f'{made}/exact_224.bmp')
  _save(chelsea.resize((256, 310)), f'{made}/short_side_256.webp', quality=80)
  # Crop margins of 16.5 and 54.5 pixels: torchvision rounds them half to even (16, 54).
  _save(astronaut.resize((256, 257)), f'{made}/margin_16.5.png')
  _save(chelsea.resize((333, 256)), f'{made}/margin_54.5.jpg')
  _save(astronaut.resize((333, 500)), f'{made}/sub/nested.tif')
  for name in NOT_IMAGES:
    with open(os.path.join(root, name), 'w') as f:
      f.write('not an image')
  return root


def _config(path, **overrides):
  settings = dict(source='imagefolder', path=path, num_images=0, order='sorted', batch_size=8)
  settings.update(overrides)
  return settings


def _torchvision(root, resize, crop):
  datasets = pytest.importorskip('torchvision.datasets')
  transforms = pytest.importorskip('torchvision.transforms')
  dataset = datasets.ImageFolder(root, transform=transforms.Compose(
      [transforms.Resize(resize), transforms.CenterCrop(crop)]))
  keys = [os.path.relpath(path, root) for path, _ in dataset.samples]
  images = np.stack([np.asarray(image) for image, _ in dataset])
  return keys, images, np.asarray(dataset.targets)


@pytest.mark.parametrize('resize,crop', [(256, 224), (160, 128), (100, 128)])
def test_pixels_equal_torchvision(folder, tmp_path, resize, crop):
  keys, expected, targets = _torchvision(folder, resize, crop)
  images, labels, info = data.load(_config(folder, resize_size=resize, crop_size=crop),
                                   cache_dir=str(tmp_path), progress=False)
  assert info.keys == keys
  assert images.dtype == np.uint8 and images.shape == (len(keys), crop, crop, 3)
  for key, ours, theirs in zip(keys, images, expected):
    if key == 'b_made/gray16.png':  # torchvision clips 16 bits (white); lc_jax scales them
      theirs = data.Transform(resize, crop)(Image.fromarray(skimage.data.camera()).convert('RGB'))
    np.testing.assert_array_equal(ours, theirs, err_msg=key)
  np.testing.assert_array_equal(labels, targets)
  assert info.class_names == ['a_photos', 'b_made']
  assert info.ignored_files == len(NOT_IMAGES)


def test_resized_shape_is_torchvisions():
  # torchvision's own computation of Resize(size)'s output for an int size, on shapes where
  # `int(size * long / short)` and `int(size * (long / short))` differ (short side already at
  # size: 224 x 230 stays 224 x 230, not 224 x 229) and on shapes of both orientations.
  functional = pytest.importorskip('torchvision.transforms.functional')
  shapes = [(224, 230), (230, 224), (100, 113), (113, 100), (232, 243), (257, 300), (400, 257)]
  shapes += [(h, w) for h in range(90, 360, 7) for w in range(90, 360, 11)]
  for size in (100, 112, 224, 232, 240, 256):
    for height, width in shapes:
      want = tuple(functional._compute_resized_output_size((height, width), [size]))  # pylint: disable=protected-access
      assert data.Transform(size, 32).resized_shape(height, width) == want, (size, height, width)


def test_resize_keeps_an_image_whose_short_side_is_the_size(tmp_path):
  # 230 x 224 at Resize(224): no resampling, only the centre crop, as torchvision does.
  transforms = pytest.importorskip('torchvision.transforms')
  image = Image.fromarray(skimage.data.astronaut()).resize((230, 224))
  theirs = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(200)])(image)
  np.testing.assert_array_equal(data.Transform(224, 200)(image), np.asarray(theirs))


def test_sixteen_bit_grayscale_is_rounded_to_eight_bits(tmp_path):
  # Every 16-bit value v becomes round(v * 255 / 65535) (no value is a tie: 65535 is odd), in
  # all three channels; 129 -> 1, 386 -> 2 and 65406 -> 254, where dropping the low byte
  # gives 0, 1 and 255.
  values = np.concatenate([np.arange(0, 65536, 7), [128, 129, 385, 386, 65406, 65407]])
  side = int(np.ceil(np.sqrt(values.size)))
  pixels = np.zeros(side * side, np.uint16)
  pixels[:values.size] = values
  pixels = pixels.reshape(side, side)
  Image.fromarray(pixels).save(tmp_path / 'deep.png')
  rgb = np.asarray(data.load_rgb(str(tmp_path / 'deep.png')))
  want = np.round(pixels.astype(np.float64) * 255 / 65535).astype(np.uint8)
  assert rgb.shape == (side, side, 3) and rgb.dtype == np.uint8
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], want)
  assert want.reshape(-1)[values.size - 6:values.size].tolist() == [0, 1, 1, 2, 254, 255]


def test_photos_source(tmp_path):
  transforms = pytest.importorskip('torchvision.transforms')
  images, labels, info = data.load(_config('', source='photos'), cache_dir=str(tmp_path),
                                   progress=False)
  assert labels is None and info.keys == list(data.PHOTOS)
  reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
  for name, ours in zip(info.keys, images):
    folder = data.sources.photo_dir()
    path = next(f for f in os.listdir(folder) if f.startswith(name + '.'))
    theirs = reference(Image.open(os.path.join(folder, path)).convert('RGB'))
    np.testing.assert_array_equal(ours, np.asarray(theirs), err_msg=name)


@pytest.mark.parametrize('num_total,seed', [(50000, 0), (1234, 3), (1, 0), (2, 7),
                                             (997, 2**32 - 1)])
def test_torch_order_is_the_dataloaders(num_total, seed):
  """Computed without torch; equal to what the reference DataLoader yields."""
  torch = pytest.importorskip('torch')
  dataloader = torch.utils.data.DataLoader(
      list(range(num_total)), batch_size=500, shuffle=True,
      generator=torch.Generator().manual_seed(seed))
  yielded = torch.cat(list(dataloader)).numpy()
  np.testing.assert_array_equal(subset.torch_order(num_total, seed), yielded)
  if (num_total, seed) == (50000, 0):  # the paper's 10,000: its first 20 batches of 500
    np.testing.assert_array_equal(subset.select(50000, 10000, 0, 'torch'), yielded[:10000])


def test_torch_order_refuses_sizes_where_torch_draws_64_bits():
  with pytest.raises(UserError, match='fewer than 214748364 images'):
    subset.torch_order(2**32 // 20, 0)


def test_runs_without_torch_or_tensorflow(tmp_path, repo_root):
  code = f"""
import sys
from lc_jax import data
data.select(1234, 100, 3, 'torch')
data.load(dict(source='photos', num_images=0, order='sorted'), cache_dir={str(tmp_path)!r},
          progress=False)
print(sorted(m for m in ('torch', 'torchvision', 'tensorflow', 'jax') if m in sys.modules))
"""
  child = subprocess.run([sys.executable, '-c', code], cwd=repo_root, capture_output=True,
                         text=True, check=True)
  assert child.stdout.strip() == '[]'


def test_orders_and_subset_size():
  np.testing.assert_array_equal(subset.select(10, 4, 5, 'sorted'), [0, 1, 2, 3])
  np.testing.assert_array_equal(subset.select(10, 0, 5, 'numpy'),
                                np.random.default_rng(5).permutation(10))
  with pytest.raises(UserError, match=r'asked for 11 images .* holds only 10'):
    subset.select(10, 11, 0, 'sorted')


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_hosts_cover_every_image_once(folder, tmp_path, process_count):
  config = _config(folder, batch_size=6, crop_size=32, resize_size=40)
  everything, all_labels, _ = data.load(config, cache_dir=str(tmp_path / 'one'), progress=False)
  seen, shapes = [], set()
  for index in range(process_count):
    images, labels, info = data.load(config, cache_dir=str(tmp_path / 'many'),
                                     process_index=index, process_count=process_count,
                                     progress=False)
    assert not info.cache_hit
    np.testing.assert_array_equal(images, everything[info.positions])
    batches = list(data.batches(images, labels, info))
    assert len(batches) == info.num_batches == 4  # 21 images in batches of 6
    for k, (batch, batch_labels, mask) in enumerate(batches):
      shapes.add(batch.shape)
      rows = info.positions[k * info.local_batch_size:(k + 1) * info.local_batch_size]
      # Host parts of global batch k are slices of the reference's batch k.
      assert all(k * 6 <= p < (k + 1) * 6 for p in rows)
      np.testing.assert_array_equal(batch[mask], everything[rows])
      np.testing.assert_array_equal(batch_labels[mask], all_labels[rows])
      assert (batch[~mask] == 0).all() and (batch_labels[~mask] == -1).all()
      seen.extend(rows.tolist())
  assert shapes == {(6 // process_count, 32, 32, 3)}
  assert sorted(seen) == list(range(len(everything)))


def test_hosts_reuse_a_single_host_cache(folder, tmp_path):
  config = _config(folder, batch_size=6)
  everything, _, _ = data.load(config, cache_dir=str(tmp_path), progress=False)
  images, _, info = data.load(config, cache_dir=str(tmp_path), process_index=1,
                              process_count=2, progress=False)
  assert info.cache_hit
  np.testing.assert_array_equal(images, everything[info.positions])


def test_cache_is_reused_and_keyed_by_transform(folder, tmp_path, capsys):
  config = _config(folder, crop_size=64, resize_size=72)
  first, _, info = data.load(config, cache_dir=str(tmp_path))
  assert not info.cache_hit and 'images/s' in capsys.readouterr().err
  again, _, hit = data.load(config, cache_dir=str(tmp_path))
  assert hit.cache_hit and hit.cache_path == info.cache_path and hit.fingerprint == info.fingerprint
  assert isinstance(again, np.memmap)
  np.testing.assert_array_equal(first, again)
  _, _, other = data.load(dict(config, crop_size=48), cache_dir=str(tmp_path), progress=False)
  assert not other.cache_hit and other.fingerprint != info.fingerprint


def test_killed_run_leaves_no_cache_entry(folder, tmp_path, repo_root):
  cache_dir = str(tmp_path)
  config = _config(folder, crop_size=32, resize_size=40, workers=1)
  # The child kills itself with SIGKILL halfway through decoding, as an OOM killer or scancel would.
  code = f"""
import os, signal
from lc_jax.data import loader
real, count = loader.load_rgb, [0]
def dying(file):
  count[0] += 1
  if count[0] == 6:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(file)
loader.load_rgb = dying
loader.load({config!r}, cache_dir={cache_dir!r}, progress=False)
"""
  child = subprocess.run([sys.executable, '-c', code], cwd=repo_root, capture_output=True,
                         check=False)
  assert child.returncode == -signal.SIGKILL, child.stderr.decode()
  assert not [f for f in os.listdir(cache_dir) if not f.startswith('.')]
  images, _, info = data.load(config, cache_dir=cache_dir, progress=False)
  assert not info.cache_hit and len(images) == 21


def test_failed_run_cleans_up(folder, tmp_path, monkeypatch):
  def broken(file):
    raise RuntimeError('interrupted')
  monkeypatch.setattr(loader, 'load_rgb', broken)
  with pytest.raises(RuntimeError):
    data.load(_config(folder, crop_size=32, resize_size=40), cache_dir=str(tmp_path),
              progress=False)
  assert not os.listdir(tmp_path)


@pytest.fixture
def corrupt_folder(folder, tmp_path):
  root = str(tmp_path / 'corrupt')
  shutil.copytree(os.path.join(folder, 'a_photos'), os.path.join(root, 'a'))
  with open(os.path.join(root, 'a', 'rocket.JPEG'), 'rb') as f:
    whole = f.read()
  with open(os.path.join(root, 'a', 'truncated.jpg'), 'wb') as f:
    f.write(whole[:len(whole) // 3])
  with open(os.path.join(root, 'a', 'garbage.jpeg'), 'wb') as f:
    f.write(b'\xff\xd8 this is not a JPEG')
  return root


def test_corrupt_image_is_a_clear_error(corrupt_folder, tmp_path):
  with pytest.raises(UserError, match=r'cannot decode .*/a/garbage\.jpeg .*data\.on_error=skip'):
    data.load(_config(corrupt_folder), cache_dir=str(tmp_path), progress=False)
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.npy')]


def test_corrupt_images_skipped_when_asked(corrupt_folder, tmp_path):
  config = _config(corrupt_folder, on_error='skip', batch_size=4)
  images, labels, info = data.load(config, cache_dir=str(tmp_path), progress=False)
  bad = [k for k, ok in zip(info.keys, info.valid) if not ok]
  assert bad == ['a/garbage.jpeg', 'a/truncated.jpg']
  assert len(info.skipped) == 2 and 'garbage.jpeg' in info.skipped[0]
  assert (images[~info.valid] == 0).all() and len(images) == 8
  masks = np.concatenate([mask for _, _, mask in data.batches(images, labels, info)])
  np.testing.assert_array_equal(masks, info.valid)  # 8 images, 2 batches of 4
  # A cache made while skipping is not handed to a run that asked for every image.
  with pytest.raises(UserError, match=r'2 image\(s\) did not decode .*garbage\.jpeg'):
    data.load(dict(config, on_error='raise'), cache_dir=str(tmp_path), progress=False)


def test_bad_folders(tmp_path):
  cache_dir = str(tmp_path / 'cache')
  with pytest.raises(UserError, match='image folder not found'):
    data.load(_config(str(tmp_path / 'missing')), cache_dir=cache_dir)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='has no class folders'):
    data.load(_config(str(tmp_path / 'empty')), cache_dir=cache_dir)
  (tmp_path / 'text' / 'cls').mkdir(parents=True)
  (tmp_path / 'text' / 'cls' / 'a.txt').write_text('x')
  with pytest.raises(UserError, match=r'no images in .*text \(1 other files\)'):
    data.load(_config(str(tmp_path / 'text')), cache_dir=cache_dir)
  (tmp_path / 'text' / 'cls2').mkdir()
  Image.new('RGB', (8, 8)).save(tmp_path / 'text' / 'cls2' / 'a.png')
  with pytest.raises(UserError, match=r'1 class folder\(s\) .* hold no image: cls;'):
    data.load(_config(str(tmp_path / 'text')), cache_dir=cache_dir)
  with pytest.raises(UserError, match='data.path is empty'):
    data.load(_config(''), cache_dir=cache_dir)


def test_bad_settings(folder, tmp_path):
  with pytest.raises(UserError, match=r'asked for 1000 images .* holds only 21'):
    data.load(_config(folder, num_images=1000), cache_dir=str(tmp_path))
  with pytest.raises(UserError,
                     match=r"unknown data setting 'num_image' \(did you mean num_images\?\); "):
    data.load(dict(_config(folder), num_image=5), cache_dir=str(tmp_path))
  with pytest.raises(UserError, match="unknown data.order 'random'; known: torch, numpy, sorted"):
    data.load(_config(folder, order='random'), cache_dir=str(tmp_path))
  with pytest.raises(UserError, match='does not split evenly over 3 hosts'):
    data.load(_config(folder, batch_size=8), cache_dir=str(tmp_path), process_count=3)


@pytest.fixture(scope='module')
def tfds():
  return optional.tensorflow_datasets()


def test_tfds_imagenet_selects_imagefolder_images(tfds, tmp_path):
  tf = pytest.importorskip('tensorflow')
  synsets = tfds.builder('imagenet2012').info.features['label'].names
  rng = np.random.default_rng(0)
  photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]
  examples = []
  for i in range(14):
    label = int(rng.choice([0, 1, 500]))
    height, width = rng.integers(150, 400, size=2)
    image = Image.fromarray(photos[i % 3]).resize((int(width), int(height)))
    encoded = io.BytesIO()
    image.save(encoded, format='JPEG', quality=90)
    file_name = f'ILSVRC2012_val_{i + 1:08d}.JPEG'
    path = tmp_path / 'val' / synsets[label] / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.getvalue())
    examples.append((encoded.getvalue(), label, file_name))
  examples = [examples[i] for i in rng.permutation(len(examples))]  # tfds stores its own order

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'image': [e[0] for e in examples], 'label': np.asarray([e[1] for e in examples]),
        'file_name': [e[2] for e in examples]})

  config = dict(num_images=10, order='numpy', seed=1, batch_size=5)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    images, labels, info = data.load(dict(config, source='tfds'),
                                     cache_dir=str(tmp_path / 'cache'), progress=False)
  folder_images, folder_labels, folder_info = data.load(
      dict(config, source='imagefolder', path=str(tmp_path / 'val')),
      cache_dir=str(tmp_path / 'cache'), progress=False)
  assert info.keys == folder_info.keys
  np.testing.assert_array_equal(images, folder_images)
  assert ([info.class_names[i] for i in labels]
          == [folder_info.class_names[i] for i in folder_labels])
  # Three of ImageNet's classes in wnid folders: labelled by their ImageNet-1k index, as tfds.
  np.testing.assert_array_equal(labels, folder_labels)


def test_tfds_dataset_without_file_names(tfds, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    expected = [(e['image'], e['label']) for e in tfds.as_numpy(tfds.load(
        'mnist', split='test', decoders={'image': tfds.decode.SkipDecoding()}))]
    config = dict(source='tfds', name='mnist', split='test', num_images=0, order='sorted',
                  batch_size=3, crop_size=32, resize_size=32)
    images, labels, info = data.load(config, cache_dir=str(tmp_path), progress=False)
    _, _, again = data.load(config, cache_dir=str(tmp_path), progress=False)
  # Without file names the split keeps its own order; a key says the class and the position.
  assert info.keys == [f'{label}/test[{i}]' for i, (_, label) in enumerate(expected)]
  assert again.cache_hit
  np.testing.assert_array_equal(labels, [label for _, label in expected])
  transform = data.Transform(32, 32)
  for ours, (encoded, _) in zip(images, expected):
    np.testing.assert_array_equal(ours, transform(data.load_rgb(io.BytesIO(encoded))))


def test_the_tfds_cache_is_keyed_by_the_versioned_name(tfds, tmp_path, monkeypatch):
  # A prepared tfds dataset is immutable per version, so its images are not hashed: the cache
  # key holds the versioned name (full_name), and another version of the same dataset decodes
  # anew into a cache entry of its own.
  config = dict(source='tfds', name='mnist', split='test', num_images=0, order='sorted',
                batch_size=3, crop_size=32, resize_size=32)
  with tfds.testing.mock_data(num_examples=4):
    _, _, first = data.load(config, cache_dir=str(tmp_path), progress=False)
    _, _, again = data.load(config, cache_dir=str(tmp_path), progress=False)
    version = str(tfds.builder('mnist').info.version)
    monkeypatch.setattr(tfds.core.DatasetInfo, 'full_name',
                        property(lambda self: f'{self.name}/99.0.0'))
    _, _, other = data.load(config, cache_dir=str(tmp_path), progress=False)
  assert not first.cache_hit and again.cache_hit and again.cache_path == first.cache_path
  assert not other.cache_hit and other.cache_path != first.cache_path
  assert other.fingerprint != first.fingerprint  # and so the run's identity
  assert first.dataset['version'] == version


def test_tfds_errors(tfds, tmp_path):
  with pytest.raises(UserError, match="unknown tfds dataset 'no_such_dataset'"):
    data.load(dict(source='tfds', name='no_such_dataset'), cache_dir=str(tmp_path))
  with pytest.raises(UserError, match='cannot read tfds mnist test: .*prepare it'):
    data.load(dict(source='tfds', name='mnist', split='test', path=str(tmp_path / 'none'),
                   num_images=0), cache_dir=str(tmp_path))
