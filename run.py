r"""lc-jax entry point: a config file plus overrides in, results in --workdir out.

    python run.py --config=configs/demo.py --workdir=out/demo [--config.model.checkpoint=PATH]

With no flags it runs the bundled demo into out/demo. So far the run converts the configured
checkpoint into WORKDIR/model (an orbax checkpoint and its model.json card), reusing an earlier
conversion of the same file; the layer-criticality loop builds on it.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

import converters
from converters import cli
from lc_jax import errors
from lc_jax import models

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'out/demo', 'Folder for the model and the results.')


@errors.exits_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value

  # ------------------------------------------------------------------ the model ---------------
  model_dir = os.path.join(_WORKDIR.value, 'model')
  card = models.store.read_card(model_dir)
  source = converters.reader.resolve(config.model.checkpoint)
  if card and os.path.isfile(source) and card['sha256'] == converters.reader.sha256(source):
    print(f'model: reusing {model_dir}, converted from {card["source"]}')
    return
  arch, variables, metadata = converters.convert(
      config.model.checkpoint, config.model.arch or None, trust_pickle=config.model.trust_pickle)
  converters.save(model_dir, arch, variables, metadata, overwrite=True)
  print(cli.summary(metadata, variables, model_dir))


if __name__ == '__main__':
  app.run(main)
