"""The import graph of lc_jax/ and converters/ (and run.py), read from their sources with `ast`.

Every `import` and `from ... import` counts, those inside functions too: a late import still
makes the importer depend on the imported. `from pkg import name` is an edge to the module
pkg.name when there is one, else to pkg (its __init__.py); `import lc_jax` and
`from lc_jax import __version__` are edges to lc_jax/__init__.py. Modules outside the scanned
folders (numpy, jax, absl) are left out.

The graph has no cycle, and its layers hold:
- converters/ converts local files: from lc_jax it imports only the base modules
  lc_jax.errors, lc_jax.digest, lc_jax.version, lc_jax.constants, lc_jax.models (and its
  modules), lc_jax.data and lc_jax.batches (the parity check feeds the converted model real
  images) and lc_jax.launch (its commands' flag parsing); never lc_jax.zoo, lc_jax.checkpoints
  nor the package lc_jax itself;
- lc_jax.zoo fetches and keeps files: no module of it imports converters, and its library
  (every module but its command line, cli.py and __main__.py) reaches no converters module
  even through other modules; the command's `add` checks files through lc_jax.checkpoints;
- the run-level modules (lc_jax.experiment, lc_jax.sweep, lc_jax.api, lc_jax.crossval and its
  modules, run.py) are imported only by run-level modules and by lc_jax/__init__.py, which
  re-exports the API.
"""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('lc_jax', 'converters')
SCRIPTS = ('run.py',)

CONVERTERS_MAY_IMPORT = ('lc_jax.errors', 'lc_jax.digest', 'lc_jax.version', 'lc_jax.constants',
                         'lc_jax.models', 'lc_jax.data', 'lc_jax.batches', 'lc_jax.launch')
RUN_LEVEL = ('lc_jax.experiment', 'lc_jax.sweep', 'lc_jax.api', 'lc_jax.crossval', 'run')
ZOO_COMMAND = ('lc_jax.zoo.cli', 'lc_jax.zoo.__main__')


def module_files(root: pathlib.Path, packages=PACKAGES, scripts=SCRIPTS
                 ) -> dict[str, pathlib.Path]:
  """{dotted module name: its file} for every .py file under `packages` and each of `scripts`
  (a package's __init__.py is the package's name)."""
  found = {}
  for package in packages:
    for path in sorted((root / package).rglob('*.py')):
      parts = path.relative_to(root).with_suffix('').parts
      if parts[-1] == '__init__':
        parts = parts[:-1]
      found['.'.join(parts)] = path
  for script in scripts:
    if (root / script).is_file():
      found[script[:-len('.py')]] = root / script
  return found


def _is_package(name: str, files: dict[str, pathlib.Path]) -> bool:
  return name in files and files[name].name == '__init__.py'


def _targets(node: ast.AST, importer: str, files: dict[str, pathlib.Path]) -> set[str]:
  """The scanned modules one import statement of `importer` names."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
    return {_known(name, files) for name in names} - {None}
  assert isinstance(node, ast.ImportFrom)
  base = node.module or ''
  if node.level:  # relative: from the importer's package, `level` steps up
    package = importer.split('.') if _is_package(importer, files) else importer.split('.')[:-1]
    package = package[:len(package) - (node.level - 1)]
    base = '.'.join(package + ([base] if base else []))
  found = set()
  for alias in node.names:
    full = f'{base}.{alias.name}'
    found.add(full if full in files else _known(base, files))
  return found - {None}


def _known(name: str, files: dict[str, pathlib.Path]) -> str | None:
  """`name`, or its longest scanned prefix (`import a.b.c` of a module not scanned), or None."""
  parts = name.split('.')
  while parts:
    if '.'.join(parts) in files:
      return '.'.join(parts)
    parts.pop()
  return None


def import_graph(root: pathlib.Path = ROOT, packages=PACKAGES, scripts=SCRIPTS
                 ) -> dict[str, set[str]]:
  """{module: the scanned modules it imports} from the sources under `root`."""
  files = module_files(root, packages, scripts)
  graph = {}
  for name, path in files.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges |= _targets(node, name, files)
    graph[name] = edges - {name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None when it has none."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def path_to(graph: dict[str, set[str]], start: str, wanted) -> list[str] | None:
  """The shortest import chain [start, ..., m] to a module m with `wanted(m)`, or None."""
  parents, todo = {start: None}, [start]
  while todo:
    node = todo.pop(0)
    for nxt in sorted(graph.get(node, ())):
      if nxt in parents:
        continue
      parents[nxt] = node
      if wanted(nxt):
        chain = [nxt]
        while parents[chain[-1]] is not None:
          chain.append(parents[chain[-1]])
        return chain[::-1]
      todo.append(nxt)
  return None


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + '.') for p in prefixes)


def layering_violations(graph: dict[str, set[str]]) -> dict[str, list[str]]:
  """{rule: the imports that break it} for the layers of this file's docstring."""
  converters_up = sorted(
      f'{a} imports {b}' for a, targets in graph.items() if _within(a, ['converters'])
      for b in targets if _within(b, ['lc_jax']) and not _within(b, CONVERTERS_MAY_IMPORT))
  zoo = sorted(name for name in graph if _within(name, ['lc_jax.zoo']))
  zoo_converts = [f'{a} imports {b}' for a in zoo for b in sorted(graph[a])
                  if _within(b, ['converters'])]
  for a in zoo:
    chain = None if a in ZOO_COMMAND else path_to(
        graph, a, lambda m: _within(m, ['converters']))
    if chain and len(chain) > 2:
      zoo_converts.append(f'{a} reaches {chain[-1]}: {" -> ".join(chain)}')
  run_level = sorted(f'{a} imports {b}' for a, targets in graph.items()
                     if not _within(a, RUN_LEVEL) and a != 'lc_jax' for b in targets
                     if _within(b, RUN_LEVEL))
  return {'converters/ imports only base modules of lc_jax': converters_up,
          'lc_jax.zoo imports no converter': zoo_converts,
          'only run-level modules import run-level modules': run_level}


def _file(name: str) -> str:
  """`name`'s file, relative to the repository."""
  files = module_files(ROOT)
  return os.path.relpath(files[name], ROOT) if name in files else name


@pytest.fixture(scope='module')
def graph():
  return import_graph()


def test_the_graph_sees_the_known_imports(graph):
  """The builder reads what it must: top-level, in-function and `from pkg import module`."""
  assert 'lc_jax.experiment' in graph['run']
  assert 'lc_jax.models' in graph['converters.convert']  # from lc_jax import models
  assert 'lc_jax.api' in graph['lc_jax']  # in __getattr__
  assert 'lc_jax.zoo' in graph['lc_jax.checkpoints']
  assert len(graph) > 50


def test_no_import_cycle(graph):
  cycle = find_cycle(graph)
  assert cycle is None, (f'import cycle through {len(cycle) - 1} files: '
                         + ' -> '.join(_file(name) for name in cycle))


@pytest.mark.parametrize('rule', ['converters/ imports only base modules of lc_jax',
                                  'lc_jax.zoo imports no converter',
                                  'only run-level modules import run-level modules'])
def test_layers(graph, rule):
  wrong = layering_violations(graph)[rule]
  assert not wrong, f'{rule}, but:\n' + '\n'.join(wrong)


def _tree(root: pathlib.Path, sources: dict[str, str]) -> pathlib.Path:
  for name, text in sources.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root


def test_a_cycle_is_found_and_named(tmp_path):
  """A synthetic tree whose imports close a loop through a late import in a function and a
  `from pkg import module`: the cycle is found, every file of it named."""
  root = _tree(tmp_path, {
      'lc_jax/__init__.py': 'from lc_jax.errors import UserError\n',
      'lc_jax/errors.py': 'import os\n',
      'lc_jax/zoo/__init__.py': 'from lc_jax.zoo.files import fetch\n',
      'lc_jax/zoo/files.py': 'def add():\n  import converters\n',
      'converters/__init__.py': 'from converters.convert import convert\n',
      'converters/convert.py': 'from lc_jax import zoo\nimport numpy\n',
      'run.py': 'import lc_jax\n',
  })
  graph = import_graph(root)
  assert graph['converters.convert'] == {'lc_jax.zoo'}
  assert graph['lc_jax.zoo.files'] == {'converters'}
  assert graph['run'] == {'lc_jax'}
  assert find_cycle(graph) == ['converters', 'converters.convert', 'lc_jax.zoo',
                               'lc_jax.zoo.files', 'converters']
  del graph['lc_jax.zoo.files']
  assert find_cycle(graph) is None


def test_relative_imports_and_the_version(tmp_path):
  """`from . import x`, `from .x import y` and `from lc_jax import __version__` land on the
  right files."""
  root = _tree(tmp_path, {
      'lc_jax/__init__.py': 'from lc_jax.version import __version__\n',
      'lc_jax/version.py': "__version__ = '0'\n",
      'lc_jax/zoo/__init__.py': 'from . import cache\nfrom .cache import cache_dir\n',
      'lc_jax/zoo/cache.py': 'from .. import __version__\nfrom ..version import __version__\n',
      'converters/__init__.py': '',
  })
  graph = import_graph(root)
  assert graph['lc_jax.zoo'] == {'lc_jax.zoo.cache'}
  assert graph['lc_jax.zoo.cache'] == {'lc_jax', 'lc_jax.version'}
  assert graph['lc_jax'] == {'lc_jax.version'}


def test_each_layer_rule_catches_its_break(tmp_path):
  """A synthetic tree that breaks each rule once, without a cycle: each is reported."""
  root = _tree(tmp_path, {
      'lc_jax/__init__.py': 'from lc_jax.version import __version__\n',
      'lc_jax/version.py': '',
      'lc_jax/errors.py': '',
      'lc_jax/experiment.py': 'from lc_jax import checkpoints\n',
      'lc_jax/checkpoints.py': 'import converters\nfrom lc_jax import zoo\n',
      'lc_jax/report.py': 'def f():\n  from lc_jax import experiment\n',
      'lc_jax/zoo/__init__.py': 'from lc_jax.zoo import files\n',
      'lc_jax/zoo/files.py': 'def add():\n  from lc_jax import checkpoints\n',
      'lc_jax/zoo/cli.py': 'from lc_jax import checkpoints\n',
      'converters/__init__.py': 'from converters import convert\n',
      'converters/convert.py': 'import lc_jax\nfrom lc_jax import errors\n',
  })
  graph = import_graph(root)
  graph['lc_jax.checkpoints'].discard('lc_jax.zoo')  # no cycle: the layers alone are broken
  assert find_cycle(graph) is None
  wrong = layering_violations(graph)
  assert wrong['converters/ imports only base modules of lc_jax'] == [
      'converters.convert imports lc_jax']
  assert wrong['lc_jax.zoo imports no converter'] == [
      'lc_jax.zoo reaches converters: lc_jax.zoo -> lc_jax.zoo.files -> lc_jax.checkpoints -> '
      'converters',
      'lc_jax.zoo.files reaches converters: lc_jax.zoo.files -> lc_jax.checkpoints -> converters']
  assert wrong['only run-level modules import run-level modules'] == [
      'lc_jax.report imports lc_jax.experiment']
