r"""lc-jax: layer criticality of an ImageNet classifier. A config file plus overrides in,
results in --workdir out.

    python run.py --config=configs/paper.py --workdir=out/resnet50 \
      --config.model.checkpoint=/ckpt/resnet50.pth --config.data.path=/data/imagenet/val

With no flags it runs the bundled demo (configs/demo.py) into out/demo. Writes
WORKDIR/results.csv (a row per trial and layer, appended as they come), WORKDIR/run.json and
WORKDIR/criticality.png, and prints the most and least critical layers. Re-running with the
same workdir resumes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from lc_jax import errors
from lc_jax import experiment
from lc_jax import report

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'out/demo', 'Folder for the model and the results.')
_QUIET = flags.DEFINE_bool('quiet', False, 'No progress lines.')


@errors.exits_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if _QUIET.value:
    config.progress = False

  # ---------------------------------------------------------------------- run (or resume) -----
  experiment.run(config, _WORKDIR.value)

  # ---------------------------------------------------------------------- report --------------
  print(report.write_workdir_report(_WORKDIR.value))


if __name__ == '__main__':
  app.run(main)
