"""The run configuration every config file starts from: the paper's protocol.

    config = lc_jax.config.default()
    config.model.checkpoint = '/ckpt/resnet50.pth'

Fields:
- model: checkpoint (a file, or bundled:NAME), arch (empty: inferred), id (the row label in
  results; empty: the checkpoint's file name), trust_pickle;
- data: see lc_jax.data.config (source, path, num_images, batch_size, seed, order, sizes, ...);
- reset: mode (fresh, zero, checkpoint, interpolate, skip), layer_types ('conv,linear'; add
  batchnorm for the reference code's default), layers (a pattern; empty: all), granularity
  (layer, block, stage), init_scheme (empty: the architecture's), init_checkpoint (for mode
  checkpoint), alpha (the trained weights' share for mode interpolate);
- trials, seed: trial t of a random mode draws its fresh model from fold_in(key(seed), t);
- matmul_precision: 'highest' keeps float32 exact on GPU/TPU too;
- precision: 'float32' (exact, the default) or 'bfloat16' (faster on accelerators; weights stay
  float32, activations and matmuls run in bfloat16);
- reuse_prefix: a reset of a layer re-runs the network only from the block that contains it, on
  the original model's activations there (results are identical; False re-runs it all);
- spread_resets: split the devices (one process's) into this many groups, each evaluating other resets
  on the whole batch (for batches small next to the device count); 1: every device takes a
  slice of every batch;
- chunk_size: run each batch through the model in chunks of at most this many images (0: whole
  batches). Bounds the activation the walk keeps and each segment's temporaries for a large
  data.batch_size; the numbers are the same within float32 rounding (a batch is only the unit
  of saved progress); chunks are a multiple of the device count;
- progress: print progress lines; cache_dir: where decoded images are cached (empty: default).
"""

import ml_collections

from lc_jax import data


def default() -> ml_collections.ConfigDict:
  """The paper's protocol: 10,000 ImageNet val images, conv + linear layers, fresh, 3 trials."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      'checkpoint': '', 'arch': '', 'id': '', 'trust_pickle': False})
  config.data = data.default_config()
  config.reset = ml_collections.ConfigDict({
      'mode': 'fresh', 'layer_types': 'conv,linear', 'layers': '', 'granularity': 'layer',
      'init_scheme': '', 'init_checkpoint': '', 'alpha': 0.0})
  config.trials = 3
  config.seed = 0
  config.matmul_precision = 'highest'
  config.precision = 'float32'
  config.reuse_prefix = True
  config.spread_resets = 1
  config.chunk_size = 0
  config.progress = True
  config.cache_dir = ''
  return config
