"""The command `python -m lc_jax.report`, and the per-workdir report that run.py prints at the end
of a run.

    python -m lc_jax.report OUT... [--out DIR] [--top N] [--category ID=NAME | --category MAP.json]
    python -m lc_jax.report OUT... --compare PAPER_CSV
    python -m lc_jax.report OUT... --claims [--early=stem,layer1 --deep=layer3,layer4]
    python -m lc_jax.report --diff A B        # A, B: workdirs, or CSV@MODEL_ID

OUT is a run's workdir, a sweep's folder or a results CSV; several are read together. Prints the
most and least critical layers of each model and a table of the models, and draws heatmap.png
(layers by models, rows in bands by category), scatter.png (mean criticality against original
top-1) and, when a model has a category, profiles.png (one line per category) into --out
(default: OUT/report/ of the first OUT, or report/ beside it when it is a CSV file). Results of
several image sets (results.csv's dataset) get those figures per set (heatmap_SET.png, ...) and
datasets.png, each model's criticality per set side by side. Categories are the zoo's, or
--category's. With --compare, compares each model with the paper's results CSV instead of
drawing; with --claims, prints and writes claims.md and claims.csv (the paper's statements,
tested); both take one image set's results. With --diff, prints B - A per layer with paired 95%
intervals and writes diff.csv and diff.png.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Sequence

from lc_jax import errors
from lc_jax import launch
from lc_jax import schema
from lc_jax import workdir
from lc_jax.errors import UserError
from lc_jax.report import categories
from lc_jax.report import claims
from lc_jax.report import compare
from lc_jax.report import diff
from lc_jax.report import stats
from lc_jax.report.figures import file_part, plot_criticality, plot_diff, plot_study
from lc_jax.report.read import load, per_image_of, resolve, results_of, run_images
from lc_jax.report.stats import by_model, image_sets, summarize
from lc_jax.report.text import model_table, table

CLOSED_PIPE = 141  # 128 + SIGPIPE: the exit status when the reader of the output went away


def write_workdir_report(workdir: str, top: int = 10) -> str:
  """Writes WORKDIR/criticality.png for the run in `workdir` and returns its table as text."""
  csv_path = resolve(workdir)
  summaries = summarize(load(csv_path))
  if not summaries:
    raise UserError(f'{csv_path} has no reset layer yet, only the original model')
  grouped = by_model(summaries)
  for model, layers in grouped.items():
    name = ('criticality.png' if len(grouped) == 1 else
            f'criticality_{file_part(model)}.png')
    plot_criticality(layers, os.path.join(os.path.dirname(csv_path), name))
  return table(summaries, top)


def default_out(path: str) -> str:
  """Where the figures go without --out: `report/` inside the first OUT folder, or beside it when
  it is a CSV file."""
  return os.path.join(path if os.path.isdir(path) else os.path.dirname(path) or '.', 'report')


def _out_folder(out: str) -> str:
  """Creates the --out folder if needed; refuses a file, or a folder it cannot create or write."""
  return workdir.ensure_folder(out, '--out', 'heatmap.png and scatter.png')


@errors.exits_cleanly
def main(argv: Sequence[str]) -> None:
  """The command; a reader that goes away (`| head`) ends it quietly, with status 141 as a
  program ended by SIGPIPE."""
  try:
    _main(argv)
    sys.stdout.flush()  # output buffered for a pipe meets the closed pipe here
  except BrokenPipeError:
    # What is left to print has nowhere to go, nor has the buffer Python flushes at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(CLOSED_PIPE)


def _stages(flag: str, value: Sequence[str] | None) -> list[str] | None:
  if value is None:
    return None
  names = [v.strip() for v in value if v.strip()]
  if not names:
    raise UserError(f'--{flag} names no stage: give stage names, e.g. --{flag}=stem,layer1')
  return names


def _one_image_set(datasets: Sequence[str], flag: str) -> str:
  """The one image set that `datasets` (the rows') name, '' for none; a UserError for several:
  --claims and --compare hold models of one image set against each other."""
  sets = image_sets(datasets)
  if len(sets) > 1:
    raise UserError(f'--{flag} takes the results of one image set; these hold {len(sets)}: '
                    f'{", ".join(sets)}. Give one set\'s results, e.g. python -m lc_jax.report '
                    f'OUT/{sets[0]} --{flag}')
  return sets[0] if sets else ''


def _diff(paths: Sequence[str], out: str | None, resamples: int, seed: int) -> None:
  if len(paths) != 2:
    raise UserError(f'--diff compares two runs or models, A and B; got {len(paths)}: '
                    'python -m lc_jax.report --diff A B (a workdir, or CSV@MODEL_ID)')
  (rows_a, label_a), (rows_b, label_b) = diff.select(paths[0]), diff.select(paths[1])
  source_a, source_b = rows_a[0]['source'], rows_b[0]['source']
  images_a, images_b = run_images(source_a), run_images(source_b)
  same = images_a is None or images_b is None or images_a == images_b
  d = diff.diff(rows_a, rows_b, per_image_of(source_a), per_image_of(source_b), same_images=same,
                resamples=resamples, seed=seed, labels=(label_a, label_b))
  out = workdir.ensure_folder(out or default_out(paths[0].rsplit('@', 1)[0] if not
                                                 os.path.exists(paths[0]) else paths[0]),
                              '--out', 'diff.csv and diff.png')
  csv_path, png = os.path.join(out, 'diff.csv'), os.path.join(out, 'diff.png')
  diff.write_csv(d, csv_path)
  plot_diff(d, png)
  print(diff.table(d))
  print(f'\nwrote {csv_path}\nwrote {png}')


def _main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  paths = argv[1:]
  f = flags.FLAGS
  if f.diff:
    _diff(paths, f.out, f.resamples, f.seed)
    return
  if not paths:
    raise UserError('give at least one workdir, sweep folder or results CSV: '
                    'python -m lc_jax.report OUT1 OUT2 ... [--out DIR]')
  out, top = flags.FLAGS.out or default_out(paths[0]), flags.FLAGS.top
  rows = []
  for path in paths:
    for csv_path in results_of(path):
      rows += load(csv_path)
  if flags.FLAGS.compare:
    image_set = _one_image_set([r['dataset'] for r in rows], 'compare')
    if image_set not in ('', schema.IMAGENET_VAL):
      print(f'note: these results are of {image_set}; the paper measured ImageNet val '
            f'({schema.IMAGENET_VAL})')
    comparisons = compare.compare(load(flags.FLAGS.compare), rows)
    if not comparisons:
      raise UserError(f'no model of {", ".join(paths)} is in {flags.FLAGS.compare} (model_id '
                      'must match: run the sweep, or set --config.model.id)')
    print(compare.comparison_table(comparisons))
    return
  summaries = summarize(rows)
  if not summaries:
    raise UserError(f'no reset layer in {", ".join(paths)}: only original-model rows')
  category_of, order = categories.of_summaries(summaries, categories.parse(f.category or []))
  if f.claims:
    _one_image_set([s.dataset for s in summaries], 'claims')
    ids = dict.fromkeys(s.model_id for s in summaries)
    of_id, _ = categories.assign(list(ids), categories.parse(f.category or []))
    measured = claims.claims(summaries, of_id, order, _stages('early', f.early),
                             _stages('deep', f.deep), f.resamples, f.seed)
    out = workdir.ensure_folder(out, '--out', 'claims.md and claims.csv')
    md, table_path = claims.write(measured, out)
    print(claims.markdown(measured))
    print(f'wrote {md}\nwrote {table_path}')
    return
  out = _out_folder(out)  # checked before anything is printed or drawn

  # Drawn before anything is printed: a reader that stops early (`| head`) loses no figure.
  try:
    drawn = plot_study(summaries, out, category_of, order)
  except OSError as e:
    raise UserError(f'cannot write into the --out folder {out}: {e.strerror or e}') from None
  if top > 0:
    print(table(summaries, top), end='\n\n')
  print(model_table(summaries), end='\n\n')
  for figure in drawn:
    if figure.path:
      print(f'wrote {figure.path}')
    if figure.note:
      print(f'  {figure.note}' if figure.path else figure.note)
  earlier = stale_figures(out, [figure.path for figure in drawn if figure.path])
  if earlier:
    print(f'note: {out} also holds figures this report did not draw, from an earlier one: '
          f'{", ".join(earlier)}')


STUDY_FIGURES = re.compile(r'^(heatmap|scatter|profiles)(_.+)?\.png$|^datasets\.png$')


def stale_figures(folder: str, drawn: Sequence[str]) -> list[str]:
  """The study figures (STUDY_FIGURES) in `folder` that are not among `drawn`: left by an
  earlier report over other runs or sets, and easily taken for this one's."""
  drawn = {os.path.basename(path) for path in drawn}
  return sorted(name for name in os.listdir(folder)
                if STUDY_FIGURES.match(name) and name not in drawn)


def run() -> None:
  """Defines the flags and runs `main` (python -m lc_jax.report)."""
  # Flags are defined only when run as a program: the runner imports this package as a library
  # and may define flags of the same names.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', None, 'Folder for heatmap.png and scatter.png (created); by '
                      'default report/ in the first OUT folder, or beside it when it is a CSV.')
  flags.DEFINE_integer('top', 10, 'Most and least critical layers listed per model; 0: none.')
  flags.DEFINE_string('compare', None, "The paper's results CSV: compare each model of OUT... "
                      'with it (mean criticality, rank correlation, largest differences in '
                      'trial standard errors, original top-1) instead of drawing figures.')
  flags.DEFINE_multi_string('category', None, 'A model\'s category, ID=NAME (repeatable), or '
                            'the path of a JSON map ({category: [ids]} or {id: category}); '
                            'wins over the zoo\'s categories. Models without one: "other".')
  flags.DEFINE_bool('claims', False, 'Test the paper\'s statements: early and deep criticality '
                    'by category, changes with 95% bootstrap intervals and permutation p-values; '
                    'prints them and writes claims.md and claims.csv into --out.')
  flags.DEFINE_list('early', None, 'Stages that are early for --claims (default per '
                    'architecture: the stem and the first quarter of the stages; ResNet-50: '
                    'stem,layer1).')
  flags.DEFINE_list('deep', None, 'Stages that are deep for --claims (default: the last half '
                    'of the stages; ResNet-50: layer3,layer4).')
  flags.DEFINE_bool('diff', False, 'Compare two runs or models A B (workdirs, or CSV@MODEL_ID): '
                    'B - A per layer with a paired 95% interval; writes diff.csv and diff.png.')
  flags.DEFINE_integer('resamples', stats.RESAMPLES, 'Bootstrap replicates (and random permutations) '
                       'of --claims and --diff.', lower_bound=100)
  flags.DEFINE_integer('seed', stats.SEED, 'Seed of the bootstrap and the permutations.')
  app.run(main, flags_parser=functools.partial(launch.parse_flags, usage=__doc__))
