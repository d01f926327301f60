"""The model's forward split at block boundaries, compiled once per distinct segment, over a mesh.

    forward = Forward(module, layers)            # layers: lc_jax.layers.inventory(module, ...)
    x = forward.put(images)                      # sharded over the mesh's 'batch' axis
    logits = forward(variables, x)               # the whole network
    h = forward(variables, x, 0, 3)              # the input of segment 3 ...
    logits = forward(reset_variables, h, 3)      # ... and the rest of the network from there

A model's forward is a chain of segments (`module.segments()`: 'stem', each residual block,
'head'). Each segment is jitted on its own and compiled once, for whatever variables it is given,
so the original model and every reset of it share the compiled code, and a run from segment k
chains the compiled segments k, k+1, ... on the device without a host round trip. A segment is
handed only its own variables (the layers the inventory assigns to its block), so a reset
elsewhere does not even reach it. A block that a family can build on its own
(`module.standalone(k)`: the block module and its variables' path) runs as that module on its
variables re-rooted, so equal blocks (a stage's blocks after its first, all of a ViT's) are one
program, compiled once. A model without segments (any Flax model, lc_jax.adapters) is one
segment, 'model', given by its pure apply: `Forward(None, layers, apply=apply)`.

Devices (lc_jax.sharding): all devices (every process's, with several) form a `Mesh` with axes
('resets', 'batch'). Images are sharded along 'batch' (a batch comes padded to a multiple of its
size, the padding masked out, from lc_jax.data.chunks) and variables are replicated. By default
'resets' has size 1: every device holds a slice of every batch. When batches are small next to
the device count, `resets=R` splits the devices into R groups and `many` evaluates R resets at
once, one per group, each on the whole batch (sharded within its group). On one device all of
this is plain jit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lc_jax import batches
from lc_jax import layers as layers_lib
from lc_jax import sharding
from lc_jax import timing
from lc_jax import errors

# precision: (the dtype activations and matmuls run in, the matmul precision it implies or None
# for the run's matmul_precision). 'tf32' is float32 storage with TensorFloat-32 convolutions
# and matmuls where the hardware has them (NVIDIA since Ampere; PyTorch's cuDNN convolutions
# default to it), float32 elsewhere.
PRECISIONS = {'float32': (jnp.float32, None), 'tf32': (jnp.float32, 'tensorfloat32'),
              'bfloat16': (jnp.bfloat16, None)}


def compute_dtype(precision: str):
  """The dtype of a precision name (PRECISIONS); an unknown name is refused."""
  if precision not in PRECISIONS:
    raise errors.unknown('precision', precision, PRECISIONS)
  return PRECISIONS[precision][0]


def matmul_precision(precision: str, matmul: str = 'highest') -> str:
  """The matmul precision a run of `precision` computes at: 'tensorfloat32' for 'tf32', else the
  run's own `matmul` (the expert setting)."""
  compute_dtype(precision)
  return PRECISIONS[precision][1] or matmul


def with_precision(module: nn.Module, precision: str) -> nn.Module:
  """`module` computing in `precision` (PRECISIONS); weights stay float32."""
  return module.clone(dtype=compute_dtype(precision))


class Forward:
  """`module`'s forward by segments; see the module docstring."""

  def __init__(self, module: nn.Module | None, layers: Sequence[layers_lib.Layer],
               mesh: Mesh | None = None,
               apply: Callable[[dict, jax.Array], jax.Array] | None = None):
    """`module` with segments (lc_jax.models), or, when it is None, a model without them given
    by its pure `apply(variables, images) -> logits`: then the whole model is one segment,
    'model', which every reset runs from (no prefix reuse)."""
    self.module = module
    self.mesh = mesh or sharding.make_mesh()
    if module is None:
      self.names: tuple[str, ...] = ('model',)
      self._paths = None  # the whole model reads all of its variables
      self._runs, self._roots = (_Apply(apply),), ((),)
    else:
      self.names = tuple(module.segments())
      self._paths = segment_paths(self.names, layers)
      # What each segment's program runs, and the path its variables are re-rooted from.
      self._runs, self._roots = zip(*(_segment_run(module, k, self._paths[k])
                                      for k in range(len(self.names))))
    self.index = {name: k for k, name in enumerate(self.names)}
    # The variables are arguments, never constants, and the programs are shared by every
    # Forward of an equal module on the same mesh: a second model of the same architecture,
    # shapes and precision compiles nothing.
    self._program = program = _segment_program(self.mesh)
    # Segment k on `x`, given its own variables (`_own`), placed.
    self._segment = lambda own, x, k: program(self._runs[k], own, x)
    self._compiled: list[Any] = []  # what `compile` made, kept alive with the Forward
    # Each segment's bytes accessed on the batch shape `lower` saw (XLA's cost analysis; 0 where
    # the backend gives none): what progress weighs the work left by.
    self.cost: list[float] = []
    self._spread: set[tuple[int, str]] = set()  # the (segment, kind) spread programs used
    # Called with each segment's output as soon as the segment is dispatched (Busy.dispatched).
    self.on_dispatch: Callable[[jax.Array], None] = lambda x: None

  @property
  def rows_multiple(self) -> int:
    """What this process's rows of a batch must be a multiple of (sharding.rows_multiple)."""
    return sharding.rows_multiple(self.mesh)

  def start(self, target: layers_lib.Target) -> int:
    """The first segment a reset of `target` changes: where its re-run has to begin."""
    if self._paths is None:
      return 0
    return min(self.index[layer.block] for layer in target.layers)

  def put(self, batch: np.ndarray) -> jax.Array:
    """A host batch (images, labels or mask), already a multiple of `rows_multiple` rows
    (lc_jax.data.chunks pads it once, with a mask), sharded over the mesh."""
    return sharding.shard_batch(self.mesh, batch)

  def placed(self, part: np.ndarray) -> jax.ShapeDtypeStruct:
    """The shape, dtype and placement `put` gives a batch of which `part` is this process's
    rows (every process holds as many)."""
    return jax.ShapeDtypeStruct((part.shape[0] * jax.process_count(), *part.shape[1:]),
                                part.dtype, sharding=NamedSharding(self.mesh, P('batch')))

  def replicate(self, variables: dict) -> dict:
    """`variables` placed on every device of the mesh (done once for the trained weights)."""
    return sharding.replicate(self.mesh, variables)

  def __call__(self, variables: dict, x: jax.Array, start: int = 0,
               stop: int | None = None) -> jax.Array:
    """Segments [start, stop) of the model on `x`, the input of segment `start` (uint8 images
    for 0). Dispatches one compiled segment after the other; nothing waits for the device."""
    for k in range(start, len(self.names) if stop is None else stop):
      x = self._segment(self.replicate(self._own(variables, k)), x, k)
      self.on_dispatch(x)
    return x

  def inputs(self, variables: dict, images: jax.ShapeDtypeStruct) -> list[jax.ShapeDtypeStruct]:
    """Each segment's input for a batch of `images` (traced, nothing is computed): what the
    walk keeps while the resets of that segment run."""
    shapes = [images]
    for k in range(len(self.names) - 1):
      shapes.append(jax.eval_shape(self._runs[k], self._own(variables, k), shapes[-1]))
    return shapes

  def lower(self, variables: dict, images: jax.ShapeDtypeStruct | jax.Array
            ) -> tuple[list[jax.stages.Lowered], jax.ShapeDtypeStruct]:
    """Every segment program a forward of `images` (their global shape and dtype) runs, each
    distinct program lowered once (traced, nothing compiled or computed), and the logits'
    abstract value, placed as the programs leave them. `timing.compile_all` then compiles them
    together; the forward's calls find them compiled."""
    replicated, batch = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P('batch'))
    placed = lambda leaf, sharding: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype,
                                                         sharding=sharding)
    h = placed(images, batch)
    outputs: dict[tuple, jax.ShapeDtypeStruct] = {}
    cost: dict[tuple, float] = {}
    lowered = []
    self.cost = []
    for k, run in enumerate(self._runs):
      key = (run, h.shape, h.dtype)
      if key not in outputs:
        own = jax.tree.map(lambda leaf: placed(leaf, replicated), self._own(variables, k))
        lowered.append(self._program.lower(run, own, h))
        outputs[key] = placed(lowered[-1].out_info, batch)
        cost[key] = _bytes_accessed(lowered[-1])
      self.cost.append(cost[key])
      h = outputs[key]
    return lowered, h

  def compile(self, lowered: Sequence[jax.stages.Lowered]) -> None:
    """Compiles `lowered` (from `lower`, and other programs the run calls) together
    (`timing.compile_all`), and keeps them with this Forward."""
    self._compiled += timing.compile_all(lowered)

  def programs(self, inputs: Sequence[jax.ShapeDtypeStruct]) -> int:
    """How many segment programs a forward compiles, given each segment's input (`inputs`): one
    per segment, except that equal blocks on inputs of one shape share theirs."""
    return len({(run, x.shape, x.dtype) for run, x in zip(self._runs, inputs)})

  def many(self, variables: Sequence[dict], x: jax.Array, start: int) -> list[jax.Array]:
    """Logits of every tree in `variables` from segment `start` on `x` (as `__call__`).

    With a 'resets' mesh axis of size R, R trees run at once, one per device group. A segment
    whose variables are the same objects in all R trees (a segment after the reset layer's:
    reset trees share every untouched leaf) runs on the stacked activations with one copy of
    its variables; only segments that differ are stacked R times."""
    groups = self.mesh.shape['resets']
    if groups == 1:
      return [self(tree, x, start) for tree in variables]
    logits = []
    for first in range(0, len(variables), groups):
      chunk = list(variables[first:first + groups])
      count = len(chunk)
      chunk += chunk[-1:] * (groups - count)  # a short last chunk repeats its last tree
      h, stacked = x, False  # stacked: h holds one activation per group, (R, batch, ...)
      for k in range(start, len(self.names)):
        own = [self._own(tree, k) for tree in chunk]
        if _same_leaves(own):
          if stacked:
            h = self._spread_segment(k, 'one variables')(self.replicate(own[0]), h)
            self.on_dispatch(h)
          else:
            h = self._segment(self.replicate(own[0]), h, k)
            self.on_dispatch(h)
        else:
          trees = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                               *[self.replicate(tree) for tree in own])
          h = self._spread_segment(k, 'stacked' if stacked else 'one input')(trees, h)
          self.on_dispatch(h)
          stacked = True
      logits += [h[i] for i in range(count)] if stacked else [h] * count
    return logits

  def _spread_segment(self, k: int, kind: str):
    """Segment k under shard_map, each device group running its own reset: 'one input' (every
    group's variables on the walk's activation), 'stacked' (its variables on its activation)
    or 'one variables' (the same variables on each group's activation)."""
    self._spread.add((k, kind))
    return _spread_program(self.mesh, self._runs[k], kind)

  def _own(self, variables: dict, k: int) -> dict:
    """Segment k's variables as its program reads them: `_variables_of`, re-rooted at its
    standalone block's path when it has one."""
    if self._paths is None:
      return variables
    return _rerooted(self._variables_of(variables, k), self._roots[k])

  def _variables_of(self, variables: dict, k: int) -> dict:
    """The part of `variables` that segment k reads: its layers' subtrees, paths kept."""
    own: dict[str, Any] = {}
    for collection, tree in variables.items():
      for path in self._paths[k]:
        node = tree
        for part in path:
          node = node.get(part) if isinstance(node, dict) else None
        if node is None:
          continue
        out = own.setdefault(collection, {})
        for part in path[:-1]:
          out = out.setdefault(part, {})
        out[path[-1]] = node
    return own


@dataclasses.dataclass(frozen=True)
class _Run:
  """What one segment program computes: segment `k` of `module`, or, with `k` None, `module`
  whole (a block on its own). Static for jit and compared by value, so equal runs share one
  program."""

  module: nn.Module
  k: int | None = None

  def __call__(self, variables: dict, x: jax.Array) -> jax.Array:
    x = batches.to_unit(x)  # images as stored; float images come in [0, 1]
    if self.k is None:
      return self.module.apply(variables, x)
    return self.module.apply(variables, x, self.k, self.k + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class _Apply:
  """What the one program of a model without segments computes: its `apply` on the images, uint8
  ones scaled to [0, 1]. Compared by identity: one program per model."""

  apply: Callable[[dict, jax.Array], jax.Array]

  def __call__(self, variables: dict, x: jax.Array) -> jax.Array:
    return self.apply(variables, batches.to_unit(x))


def _bytes_accessed(lowered: jax.stages.Lowered) -> float:
  """The bytes XLA estimates a lowered program reads and writes; 0 where it gives no estimate.
  On the demo's EfficientNet-Lite0 (CPU) it tracks a segment's time better than its FLOPs,
  which miss the cost of the memory-bound early, wide-resolution convolutions."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # an estimate only, not every backend has it
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('bytes accessed', 0.0) or 0.0)


def _segment_run(module: nn.Module, k: int, paths: Sequence[tuple[str, ...]]
                 ) -> tuple[_Run, tuple[str, ...]]:
  """(what segment k's program runs, the path its variables are re-rooted from): the family's
  standalone block when it has one (`module.standalone(k)`), else the model's segment k."""
  block = getattr(module, 'standalone', lambda k: None)(k)
  if block is None:
    return _Run(module, k), ()
  block_module, root = block
  outside = [path for path in paths if tuple(path[:len(root)]) != tuple(root)]
  if outside:
    raise ValueError(f'segment {k}: layer {"/".join(outside[0])} lies outside its block '
                     f'{"/".join(root)}')
  return _Run(block_module), tuple(root)


def _rerooted(variables: dict, root: tuple[str, ...]) -> dict:
  """`variables` (a segment's own) with every collection's subtree at `root` as its top."""
  out = {}
  for collection, tree in variables.items():
    for part in root:
      tree = tree[part]
    out[collection] = tree
  return out


def _run(run: _Run, variables: dict, x: jax.Array) -> jax.Array:
  return run(variables, x)


@functools.lru_cache(maxsize=None)
def _segment_program(mesh: Mesh):
  """One jitted segment for every module on `mesh` (what it runs is a static argument: jit
  compiles once per (run, input shape), whichever Forward and whichever segment asks)."""
  sharded = NamedSharding(mesh, P('batch'))
  return jax.jit(_run, static_argnums=(0,),
                 in_shardings=(NamedSharding(mesh, P()), sharded), out_shardings=sharded)


@functools.lru_cache(maxsize=None)
def _spread_program(mesh: Mesh, run: _Run, kind: str):
  stacked_vars, stacked_input = {'one input': (True, False), 'stacked': (True, True),
                                 'one variables': (False, True)}[kind]

  def body(tree, x):
    if not stacked_input:
      return jax.lax.map(lambda t: run(t, x), tree)
    if not stacked_vars:
      return jax.lax.map(lambda h: run(tree, h), x)
    return jax.lax.map(lambda pair: run(*pair), (tree, x))
  return jax.jit(jax.shard_map(
      body, mesh=mesh,
      in_specs=(P('resets') if stacked_vars else P(),
                P('resets', 'batch') if stacked_input else P('batch')),
      out_specs=P('resets', 'batch')))


def segment_paths(names: Sequence[str], layers: Sequence[layers_lib.Layer]
                  ) -> list[list[tuple[str, ...]]]:
  """For each segment (`names`, in order), the variable paths of the layers in it: computed once
  from the model's segments and its inventory, so the two cannot disagree unnoticed."""
  index = {name: k for k, name in enumerate(names)}
  paths: list[list[tuple[str, ...]]] = [[] for _ in names]
  for layer in layers:
    if layer.block not in index:
      raise ValueError(f'layer {layer.name} lies in {layer.block!r}, which is not a segment '
                       f'({", ".join(names)})')
    paths[index[layer.block]].append(layer.path)
  return paths


def _same_leaves(trees: Sequence[dict]) -> bool:
  """Whether every tree holds the very same leaf objects as the first (shared, not equal)."""
  first = jax.tree.leaves(trees[0])
  return all(len(leaves) == len(first) and all(a is b for a, b in zip(leaves, first))
             for leaves in map(jax.tree.leaves, trees[1:]))
