r"""lc-jax: layer criticality of an ImageNet classifier. A config file plus overrides in,
results in --workdir out.

    python run.py --config=configs/paper.py --workdir=out/resnet50 \
      --config.model.checkpoint=/ckpt/resnet50.pth --config.data.path=/data/imagenet/val

With no flags it runs the bundled demo (configs/demo.py) into out/demo. Writes
WORKDIR/results.csv (a row per trial and layer, appended as they come), WORKDIR/run.json and
WORKDIR/criticality.png, and prints the most and least critical layers. Re-running with the
same workdir resumes.

Over several processes (the hosts of a TPU pod or a GPU cluster), start the same command on
every host with --distributed (jax.distributed.initialize() finds the cluster: Cloud TPU,
SLURM, Open MPI, ...), or with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I. Each host decodes its part of every batch; WORKDIR must be one folder all
hosts see (a shared filesystem): the first process writes it.
"""

from lc_jax import launch

launch.one_malloc_arena()  # before JAX starts its threads

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
import jax

from lc_jax import errors
from lc_jax import experiment
from lc_jax import report

_FLAGS = launch.define_flags(default_workdir='out/demo')


@errors.exits_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = launch.config_of(_FLAGS)

  # ---------------------------------------------------------------------- run (or resume) -----
  experiment.run(config, _FLAGS.workdir.value)

  # ---------------------------------------------------------------------- report --------------
  if jax.process_index() == 0:
    print(report.write_workdir_report(_FLAGS.workdir.value))


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
