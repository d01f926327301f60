"""The command `python -m lc_jax.zoo VERB ...`, the models of the paper's study:

    list [--category C]             the models: id, category, recipe, normalisation, top-1, cached
    info ID                         one model in full: sources, sha256, cache paths, notes
    fetch ID... | --all | --category C    downloads (and verifies) the models' files
    add ID FILE [FILE]              registers files downloaded by hand (backbone, then head)
                                    once they convert (lc_jax.checkpoints.add)

An ID may also be a checkpoint on the Hugging Face Hub, hf:REPO[/FILE][@REVISION]
(lc_jax.zoo.hub): `fetch` gets its weights and config.json, `add hf:... WEIGHTS [CONFIG]`
registers them (a config.json beside the weights is taken too), `info` shows its files.

`fetch` goes on past a model that fails, reports each failure, and exits 1 at the end if any did.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

from lc_jax import checkpoints
from lc_jax import errors
from lc_jax import launch
from lc_jax.constants import IMAGENET_MEAN, IMAGENET_STD
from lc_jax.errors import UserError
from lc_jax.zoo import cache
from lc_jax.zoo import files
from lc_jax.zoo import hub
from lc_jax.zoo import registry
from lc_jax.zoo import transport
from lc_jax.zoo.entries import Entry, Source

USAGE = ('python -m lc_jax.zoo list [--category C] | info ID | fetch ID... | fetch --all | '
         'fetch --category C | add ID FILE [FILE] (ID: a paper model, or '
         'hf:REPO[/FILE][@REVISION])')


def _norm(entry: Entry) -> str:
  if (entry.mean, entry.std) == (IMAGENET_MEAN, IMAGENET_STD):
    return 'imagenet'
  return 'none' if set(entry.mean) == {0.0} and set(entry.std) == {1.0} else 'custom'


def _cached(entry: Entry) -> str:
  present = sum(cache.is_cached(entry.id, s) for s in entry.sources)
  n = len(entry.sources)
  return 'yes' if present == n else 'no' if not present else f'{present}/{n}'


def list_table(category: str | None = None) -> str:
  """The `list` table: one row per model."""
  rows = [('id', 'category', 'recipe', 'norm', 'top-1', 'cached')]
  for model_id in registry.ids(category):
    e = registry.get(model_id)
    rows.append((e.id, e.category, e.recipe, _norm(e), f'{e.expected_top1:.2f}', _cached(e)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.append(f'{len(rows) - 1} models; top-1 on the paper\'s 10k validation subset; cache '
               f'{cache.cache_dir()} (cached = files in place; their sha256 is checked on use)')
  return '\n'.join(lines)


def info_text(model_id: str) -> str:
  """The `info` text: everything the registry knows about one model (or an hf: id's files)."""
  table = transport.mirror_map()
  if hub.is_hub(model_id):
    hub_id = hub.parse(model_id)
    lines = [f'id:            {hub_id.key}', f'label:         {hub_id.label}']
    for n, s in enumerate((hub_id.weights, hub_id.config), 1):
      lines += _source_lines(hub_id.key, s, table, f'file {n}: ')
    lines.append(f'notes:         {hub.CONFIG} is optional: without one, the weights\' keys '
                 'tell the architecture')
    return '\n'.join(lines)
  e = registry.get(model_id)
  lines = [f'id:            {e.id}', f'category:      {e.category}', f'method:        {e.method}',
           f'recipe:        {e.recipe}',
           f'normalisation: {_norm(e)} (mean {e.mean}, std {e.std})',
           f'init scheme:   {e.init_scheme}',
           f'top-1:         {e.expected_top1:.2f} (paper\'s 10k subset), '
           f'{e.full_val_top1:.2f} (full validation set)']
  for n, s in enumerate(e.sources, 1):
    role = '' if len(e.sources) == 1 else (' (backbone)' if n == 1 else ' (head)')
    lines += _source_lines(e.id, s, table, f'file {n}{role}: ')
  lines.append(f'notes:         {e.notes or "-"}')
  return '\n'.join(lines)


def _source_lines(model_id: str, s: Source, table: dict[str, str], title: str) -> list[str]:
  """The `info` lines of one file: where it comes from, its sha256, its place in the cache."""
  lines = [title.ljust(15) + f'{s.filename} ({s.kind})']
  if s.kind == 'hf':
    lines.append(f'  repo:        {s.repo} @ {s.revision}')
  if s.kind == 'gdrive':
    lines.append(f'  drive id:    {s.gdrive_id}')
  lines.append(f'  url:         {s.canonical_url}')
  mirror = transport.mirrored(s, table)
  if mirror:
    lines.append(f'  mirror:      {mirror}')
  recorded = cache.recorded(model_id, s)
  digest = (f'{s.sha256} (known)' if s.sha256 else
            f'{recorded} (recorded at first download)' if recorded else
            'not known; recorded at first download (trust on first use)')
  lines.append(f'  sha256:      {digest}')
  lines.append(f'  cache:       {cache.path(model_id, s)} '
               f'({"present" if cache.is_cached(model_id, s) else "absent"})')
  return lines


def fetch_many(model_ids: Sequence[str], offline: bool | None, progress: bool) -> None:
  """Fetches each model, going on past failures; one UserError at the end names the failed."""
  failed = []
  for model_id in model_ids:
    try:
      if hub.is_hub(model_id):
        paths = [p for p in hub.fetch(model_id, offline=offline, progress=progress) if p]
      else:
        paths = files.fetch(model_id, offline=offline, progress=progress)
    except UserError as e:
      failed.append(model_id)
      print(f'failed {model_id}: {e}', file=sys.stderr, flush=True)
    else:
      print(f'ok {model_id}: {" ".join(paths)}', flush=True)
  if failed:
    raise UserError(f'{len(failed)} of {len(model_ids)} models failed: {", ".join(failed)}')


@errors.exits_cleanly
def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) < 2:
    raise UserError(f'give a command: {USAGE}')
  command, args = argv[1], list(argv[2:])
  if command == 'list':
    _no_args(command, args)
    print(list_table(f.category))
  elif command == 'info':
    if len(args) != 1:
      raise UserError('info takes one model id: python -m lc_jax.zoo info ID')
    print(info_text(args[0]))
  elif command == 'fetch':
    if bool(args) + f.all + (f.category is not None) != 1:
      raise UserError('fetch takes model ids, or --all, or --category C (one of these)')
    model_ids = args or registry.ids(f.category)
    for model_id in model_ids:  # every id checked before the first download
      _ = hub.parse(model_id) if hub.is_hub(model_id) else registry.get(model_id)
    fetch_many(model_ids, True if f.offline else None, f.progress)
  elif command == 'add':
    if len(args) < 2:
      raise UserError('add takes a model id and its file(s): python -m lc_jax.zoo add ID FILE '
                      '[FILE]')
    for path in checkpoints.add(args[0], args[1:], trust_pickle=f.trust_pickle):
      print(f'added {path}')
  else:
    raise errors.unknown('command', command, ('list', 'info', 'fetch', 'add'))


def _no_args(command: str, args: Sequence[str]) -> None:
  if args:
    raise UserError(f'{command} takes no arguments, got {" ".join(args)}')


def run() -> None:
  """Defines the flags and runs `main` (python -m lc_jax.zoo)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('category', None, f'Only this category: {", ".join(registry.CATEGORIES)}.')
  flags.DEFINE_bool('all', False, 'fetch: every model.')
  flags.DEFINE_bool('offline', False, 'fetch: use only the cache (as LC_JAX_OFFLINE=1).')
  flags.DEFINE_bool('progress', True, 'fetch: show download progress bars.')
  flags.DEFINE_bool('trust_pickle', False, 'add: let the conversion check unpickle arbitrary '
                    'objects (only for files from a source you trust).')
  app.run(main, flags_parser=functools.partial(launch.parse_flags, usage=__doc__))
