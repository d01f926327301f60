"""ImageNet's shifted test sets through tfds (lc_jax.data.shifts): each family's labels, the
200-class restriction of ImageNet-R and ImageNet-A in every metric, the set's identity in
run.json and its name in results.csv, a resumed run on a restricted set, and ImageFolder copies
(labels by wnid or class number, ImageNet-R recognised by its folders). Images come from
`tfds.testing.mock_data` or are written by the test: nothing is downloaded.
"""

import io
import json
import os
from unittest import mock

from absl import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from numpy_metrics import numpy_reference
import optional
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import experiment
from lc_jax import metrics
from lc_jax import results
from lc_jax.batches import to_unit
from lc_jax.data import classes as classes_lib
from lc_jax.data import shifts
from lc_jax.errors import UserError

tfds = optional.tensorflow_datasets()
tf = pytest.importorskip('tensorflow')

# One name of each family, every ImageNetV2 variant; the split each is read from.
SETS = {'imagenet_v2/matched-frequency': 'test', 'imagenet_v2/threshold-0.7': 'test',
        'imagenet_v2/topimages': 'test', 'imagenet_r': 'test', 'imagenet_a': 'test',
        'imagenet_sketch': 'test', 'imagenet2012_corrupted/gaussian_noise_3': 'validation'}


def _wnids():
  return tfds.builder('imagenet2012').info.features['label'].names


def _examples(labels, seed=0):
  """Encoded JPEGs of odd sizes with the given ImageNet-1k labels and made-up file names."""
  rng = np.random.default_rng(seed)
  wnids = _wnids()
  examples = []
  for i, label in enumerate(labels):
    height, width = rng.integers(36, 60, size=2)
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(encoded, 'JPEG')
    examples.append((encoded.getvalue(), int(label), f'{wnids[label]}/{i:03d}.jpg'))
  return examples


def _mock(examples):
  """tfds mocked: every dataset reads `examples` (image bytes, label, file name)."""
  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'image': [e[0] for e in examples], 'label': np.asarray([e[1] for e in examples]),
        'file_name': [e[2] for e in examples]})
  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _restricted(name):
  return shifts.class_indices(name, _wnids())


class CNN1k(nn.Module):
  """A small CNN with ImageNet's 1000 outputs, on float NHWC images in [0, 1]."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name='conv1')(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name='conv2')(x))
    return nn.Dense(1000, name='head')(x.mean(axis=(1, 2))) * 4.0


def cnn_1k():
  """The factory of the runs below (--config.model.factory=test_shift:cnn_1k)."""
  module = CNN1k()
  return module, module.init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))


def test_class_lists_are_200_imagenet_classes_as_published():
  wnids = _wnids()
  for name, published in (('imagenet_r', classes_lib.IMAGENET_R),
                          ('imagenet_a', classes_lib.IMAGENET_A)):
    assert len(set(published)) == 200 and list(published) == sorted(published), name
    assert set(published) <= set(wnids), name
  # The sets' own evaluation code: imagenet-r's comment of indices, natural-adv-examples'
  # thousand_k_to_200 (their first and last entries).
  assert _restricted('imagenet_r')[:6] == (1, 2, 4, 6, 8, 9)
  assert _restricted('imagenet_r')[-3:] == (981, 983, 988)
  assert _restricted('imagenet_a')[:6] == (6, 11, 13, 15, 17, 22)
  assert _restricted('imagenet_a')[-3:] == (986, 987, 988)
  for name in SETS:
    if not name.startswith(('imagenet_r', 'imagenet_a')):
      assert _restricted(name) is None


def test_split_is_the_sets_own_unless_given():
  for name, split in {**SETS, 'imagenet2012': 'validation', 'mnist': 'validation'}.items():
    assert data.DataConfig.from_config({'source': 'tfds', 'name': name}).split == split
  assert data.DataConfig.from_config({'source': 'tfds', 'name': 'mnist', 'split': 'test'}
                                     ).split == 'test'
  # What a run records: the paper's default still reads ImageNet val's validation split.
  assert data.DataConfig.from_config(lc_config.default().data).split == 'validation'
  with pytest.raises(UserError, match='lists several image sets; a run measures one: '
                     'python -m lc_jax.sweep'):
    data.DataConfig(source='tfds', name='imagenet_r,imagenet_sketch')
  # Without source=tfds, data.name=imagenet_r names the set an ImageFolder holds, in data.path.
  with pytest.raises(UserError, match='data.path is empty: .* an ImageFolder copy of ImageNet-R '
                     'there; for its tfds version add --config.data.source=tfds'):
    data.open_source(data.DataConfig(name='imagenet_r'))
  with pytest.raises(UserError, match='data.source=photos reads scikit-image'):
    data.DataConfig(source='photos', name='imagenet_r')


@pytest.mark.parametrize('name', list(SETS))
def test_each_set_labels_identity_and_classes(name, tmp_path):
  restricted = _restricted(name)
  # Labels inside the classes of every set (ImageNet-R and -A cover 200).
  labels = [c for c in (restricted or (0, 1, 500, 999))[::37]][:5]
  examples = _examples(labels)
  with _mock(examples):
    images, got, info = data.load(
        {'source': 'tfds', 'name': name, 'num_images': 0, 'order': 'sorted',
         'resize_size': 32, 'crop_size': 32, 'batch_size': 2},
        cache_dir=str(tmp_path), progress=False)
  assert images.shape == (len(labels), 32, 32, 3)
  # Sorted: ImageFolder order, by (class, file); the key is the file's own path.
  order = sorted(range(len(labels)), key=lambda i: examples[i][2])
  assert info.keys == [examples[i][2] for i in order]
  want = np.asarray([labels[i] for i in order])
  assert shifts.family(name) is not None
  version = str(tfds.builder(name).info.version)
  assert info.dataset == {'tfds': name, 'version': version, 'split': SETS[name],
                          **({'classes': 200} if restricted else {})}
  assert info.name == name  # the results' dataset column
  if restricted is None:
    assert info.classes is None
    np.testing.assert_array_equal(got, want)
    assert len(info.class_names) == 1000
  else:  # labels are positions among the 200, and class_names theirs
    assert info.classes == restricted
    np.testing.assert_array_equal(np.asarray(restricted)[got], want)
    assert [info.class_names[g] for g in got] == [_wnids()[w] for w in want]


def test_a_split_other_than_the_sets_own_is_in_its_name(tmp_path):
  with _mock(_examples([0, 1, 500])):
    _, _, info = data.load({'source': 'tfds', 'name': 'imagenet_sketch', 'split': 'train',
                            'num_images': 0, 'resize_size': 32, 'crop_size': 32},
                           cache_dir=str(tmp_path), progress=False)
  assert info.name == 'imagenet_sketch:train'  # the results' dataset column


def test_a_label_outside_the_200_classes_is_refused(tmp_path):
  assert 0 not in _restricted('imagenet_a')  # tench
  with _mock(_examples([6, 0, 11])), pytest.raises(
      UserError, match=r'1 image\(s\) of tfds imagenet_a test have a label outside its 200 '
      r'classes \(first: n01440764/001.jpg, label 0 n01440764\)'):
    data.load({'source': 'tfds', 'name': 'imagenet_a', 'num_images': 0, 'crop_size': 32,
               'resize_size': 32}, cache_dir=str(tmp_path), progress=False)


def test_metrics_see_the_200_way_softmax():
  restricted = _restricted('imagenet_r')
  outside = np.setdiff1d(np.arange(1000), restricted)
  rng = np.random.default_rng(0)
  ref, new = (rng.normal(size=(16, 1000)).astype(np.float32) for _ in range(2))
  ref[:, outside] += 20  # the other 800 classes dominate a 1000-way softmax
  new[:, outside] += 20
  labels = rng.integers(0, 200, 16).astype(np.int32)
  labels[:8] = np.argmax(new[:8, restricted], -1)  # half right among the 200
  cut = np.asarray(metrics.restrict(jnp.asarray(new), restricted))
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(cut)).sum(-1), 1, rtol=1e-6)
  assert set(np.asarray(restricted)[cut.argmax(-1)]) <= set(restricted)
  assert not set(new.argmax(-1)) & set(restricted)  # unrestricted, top-1 is always outside

  mask = np.ones(16, bool)
  total = metrics.accumulate(None, metrics.per_image(ref, new, labels, mask, classes=restricted))
  got = metrics.finalize(total, has_labels=True)
  want = numpy_reference(ref[:, restricted], new[:, restricted], labels)
  assert got['top1_acc'] == pytest.approx(50.0) and want['top1_acc'] == pytest.approx(50.0)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  with pytest.raises(UserError, match='classes up to index 988 of ImageNet-1k, but the model '
                     'has 10 classes'):
    metrics.per_image(ref[:, :10], None, labels, mask, classes=restricted)


def _config(tmp_path, name='imagenet_r'):
  config = lc_config.default()
  config.model.checkpoint = ''
  config.model.factory = 'test_shift:cnn_1k'
  config.data.update(source='tfds', name=name, num_images=6, batch_size=2, order='numpy',
                     resize_size=36, crop_size=32)
  config.reset.layer_types = 'conv,linear'
  config.trials = 2
  config.progress = False
  config.cache_dir = str(tmp_path / 'cache')
  return config


def _results(workdir):
  with open(os.path.join(workdir, 'results.csv'), encoding='utf-8') as f:
    return f.read()


def test_run_on_imagenet_r_restricts_records_and_resumes(tmp_path, monkeypatch):
  restricted = _restricted('imagenet_r')
  examples = _examples([restricted[i] for i in (0, 3, 50, 99, 150, 199, 7, 120)], seed=1)
  config = _config(tmp_path)
  with _mock(examples):
    straight = experiment.run(config, str(tmp_path / 'straight'))
    # The original's accuracy and loss are the 200-way protocol's on the model's own logits.
    images, labels, info = data.load(config.data, cache_dir=config.cache_dir, progress=False)
    module, variables = cnn_1k()
    logits = np.asarray(module.apply(variables, to_unit(images)))[:, restricted]
    want = numpy_reference(logits, logits, labels)
    assert straight[0]['layer'] == 'original'
    for key in ('top1_acc', 'top5_acc', 'loss'):
      assert straight[0][key] == pytest.approx(want[key], rel=1e-5), key

    # Stopped after the first batch's partial sums are saved; the second run resumes.
    save = results.Store.save_partial
    def save_then_stop(self, *args):
      save(self, *args)
      raise KeyboardInterrupt
    monkeypatch.setattr(results.Store, 'save_partial', save_then_stop)
    workdir = str(tmp_path / 'resumed')
    with pytest.raises(KeyboardInterrupt):
      experiment.run(config, workdir)
    assert os.path.exists(os.path.join(workdir, 'partial.json'))
    monkeypatch.setattr(results.Store, 'save_partial', save)
    experiment.run(config, workdir)
    assert _results(workdir) == _results(str(tmp_path / 'straight'))  # byte for byte
    assert {row['dataset'] for row in straight} == {'imagenet_r'}

    with open(os.path.join(workdir, 'run.json'), encoding='utf-8') as f:
      run = json.load(f)
    assert run['dataset'] == {'tfds': 'imagenet_r', 'version': '0.2.0', 'split': 'test',
                              'classes': 200}
    assert run['config']['data']['name'] == 'imagenet_r'
    assert run['config']['data']['split'] == 'test'
    # Another set is another run: its workdir is not resumed by it.
    with pytest.raises(UserError, match='holds a run of another configuration'):
      experiment.run(_config(tmp_path, 'imagenet_sketch'), workdir)


def test_a_sweep_runs_each_named_set_into_its_own_folder(tmp_path, monkeypatch):
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(sweep, 'run', lambda config, workdir, models: calls.append(
      (config.data.name, workdir, list(models))) or {'done': list(models), 'failed': {}})
  drawn = []  # the figure across sets (tests/test_report.py draws it from results)
  monkeypatch.setattr(sweep, '_draw_datasets', lambda workdir, states, labels: drawn.append(
      (workdir, list(states), labels)))
  config = lc_config.default()
  config.data.update(source='tfds', name='imagenet_r, imagenet_v2/topimages,imagenet_r')
  workdir = str(tmp_path / 'study')
  states = sweep.run_sets(config, workdir, ['tv_resnet50'])
  folders = [os.path.join(workdir, 'imagenet_r'), os.path.join(workdir, 'imagenet_v2/topimages')]
  assert calls == [('imagenet_r', folders[0], ['tv_resnet50']),
                   ('imagenet_v2/topimages', folders[1], ['tv_resnet50'])]
  assert list(states) == folders
  assert drawn == [(workdir, folders, ['tv_resnet50'])]
  # One set: the sweep's folder itself, as before.
  config.data.name = 'imagenet_sketch'
  assert list(sweep.run_sets(config, workdir, ['tv_resnet50'])) == [workdir]
  # A set whose folder would lie inside another's, or a name that is no folder, is refused.
  for names, why in (('imagenet_v2,imagenet_v2/topimages', 'whose folder would lie inside'),
                     ('imagenet_r,../elsewhere', 'is no image set name')):
    config.data.name = names
    with pytest.raises(UserError, match=why):
      sweep.run_sets(config, workdir, ['tv_resnet50'])
  # Several sets by name are tfds's: an ImageFolder is one set, in data.path.
  calls.clear()
  config.data.update(source='imagefolder', name='imagenet2012,imagenet_a')
  with pytest.raises(UserError, match='lists 2 image sets, which only data.source=tfds reads by '
                     'name'):
    sweep.run_sets(config, workdir, ['tv_resnet50'])
  assert not calls


def _folder(root, examples):
  """`examples` (image bytes, label, 'wnid/file') written as an ImageFolder under `root`."""
  for encoded, _, name in examples:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded)
  return str(root)


def test_folder_labels_by_wnid_by_number_else_sorted():
  from lc_jax.data import sources  # pylint: disable=g-import-not-at-top
  wnids = list(classes_lib.IMAGENET_1K)
  assert wnids == list(_wnids())  # tfds's imagenet2012 labels, line for line
  # ImageNet val's 1000 folders: torchvision's labels (nothing renumbered).
  assert sources.folder_labels(wnids) == (list(range(1000)), wnids, 'wnid')
  # A copy of three classes keeps their ImageNet-1k indices (torchvision: 0, 1, 2).
  assert sources.folder_labels(['n01443537', 'n09472597', 'n15075141'])[0] == [1, 980, 999]
  # ImageNetV2's folders are class numbers: '10' is class 10 (torchvision's sorted names: 2).
  labels, names, how = sources.folder_labels(sorted(['0', '1', '2', '10', '999']))
  assert (labels, how, len(names)) == ([0, 1, 10, 2, 999], 'number', 1000)
  # Anything else, or numbers out of range: torchvision's positions.
  for folders in (['cat', 'dog'], ['0', '1000'], ['n01443537', 'cat']):
    assert sources.folder_labels(folders) == ([0, 1], folders, 'sorted')
  # Mostly wnids (or numbers) with a stray or misspelt folder, or one number twice: refused,
  # where the stray would silently renumber every class.
  with pytest.raises(UserError, match=r'^3 of the 4 class folders in D are ImageNet wnids, but 1 '
                     r'are not \(first: n0144076\): rename or remove them'):
    sources.folder_labels(['n01443537', 'n0144076', 'n09472597', 'n15075141'], 'D')
  with pytest.raises(UserError, match=r'2 of the 3 class folders in D are class numbers below '
                     r'1000, but 1 are not \(first: extra\)'):
    sources.folder_labels(['0', '1', 'extra'], 'D')
  with pytest.raises(UserError, match='class folders 007, 7 in D name one class number twice'):
    sources.folder_labels(['007', '1', '7'], 'D')


def test_an_imagefolder_copy_of_imagenet_r_equals_its_tfds_version(tmp_path):
  restricted = _restricted('imagenet_r')
  examples = _examples(restricted, seed=2)  # one image of each of the 200 classes
  settings = {'num_images': 0, 'order': 'sorted', 'resize_size': 32, 'crop_size': 32,
              'batch_size': 50}
  with _mock(examples):
    images, labels, info = data.load({'source': 'tfds', 'name': 'imagenet_r', **settings},
                                     cache_dir=str(tmp_path / 'tfds'), progress=False)
  folder = _folder(tmp_path / 'imagenet-r', examples)
  got_images, got_labels, got = data.load(
      {'source': 'imagefolder', 'path': folder, 'name': 'imagenet_r', **settings},
      cache_dir=str(tmp_path / 'folder'), progress=False)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)  # positions among the 200
  assert (got.keys, got.classes, got.class_names) == (info.keys, restricted, info.class_names)
  assert got.name == 'imagenet_r'
  assert got.dataset == {'imagefolder': 'imagenet_r', 'labels': 'wnid', 'classes': 200}
  # Left at the default name, ImageNet-R's classes may be ImageNet-R or those classes of
  # ImageNet val (200-way or 1000-way): the user says which.
  with pytest.raises(UserError, match=r'holds the 200 classes of ImageNet-R: add '
                     r'--config.data.name=imagenet_r to measure it as ImageNet-R \(predictions '
                     r'restricted to those classes\), or give it a name of your own \(e.g. '
                     r'--config.data.name=imagenet200\) to measure it 1000-way'):
    data.load({'source': 'imagefolder', 'path': folder, **settings},
              cache_dir=str(tmp_path / 'folder'), progress=False)
  _, _, own = data.load({'source': 'imagefolder', 'path': folder, 'name': 'imagenet200',
                         **settings}, cache_dir=str(tmp_path / 'folder'), progress=False)
  assert (own.name, own.classes) == ('imagenet200', None)
  # Named as a set whose classes these are not: one line.
  with pytest.raises(UserError, match=r'is no ImageFolder copy of ImageNet-A: its class folders '
                     r"should be among ImageNet-A's 200 wnids, but \d+ are not \(first: "
                     r'n01443537\)'):
    data.load({'source': 'imagefolder', 'path': folder, 'name': 'imagenet_a', **settings},
              cache_dir=str(tmp_path / 'folder'), progress=False)

  # 199 of its classes: measured 1000-way as named, with a warning; labels ImageNet-1k indices.
  partial = _folder(tmp_path / 'part', examples[1:])
  with mock.patch.object(logging, 'warning') as warned:
    got_images, got_labels, got = data.load({'source': 'imagefolder', 'path': partial,
                                             **settings},
                                            cache_dir=str(tmp_path / 'folder'), progress=False)
  assert 'are all among the 200 classes of ImageNet-R' in warned.call_args[0][0] % (
      warned.call_args[0][1:])
  assert got.classes is None and got.name == 'imagenet2012'
  assert got.dataset == {'imagefolder': 'imagenet2012', 'labels': 'wnid'}
  np.testing.assert_array_equal(got_labels, np.asarray(restricted)[labels[1:]])
  np.testing.assert_array_equal(got_images, images[1:])
