"""What a figure draws, read back from its pixels: a blank or wrong plot fails.

`check_bars` asserts that report.plot_criticality drew the given summaries; `bars` reads a bar chart's bar heights (report.plot_criticality), `heatmap_cells` a heatmap's
cells (report.plot_heatmap), `blobs` the markers of a scatter plot (report.plot_scatter).
"""

import numpy as np
import PIL.Image


def _image(path) -> np.ndarray:
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n', path
  return np.asarray(PIL.Image.open(path).convert('RGB')).astype(int)


def _rgb(color: str) -> np.ndarray:
  return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])


def _runs(on: np.ndarray) -> list[list[int]]:
  """[start, end) of each run of True in a 1-D array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
  return [[a, b] for a, b in zip(edges[::2], edges[1::2])]


def bars(path, colors) -> list[int]:
  """The height in pixels of each bar drawn in one of `colors` ('#rrggbb'), left to right (a
  legend's patches, right of the axes, come last). A bar that its black error bar splits
  lengthwise is one bar."""
  image = _image(path)
  mask = np.zeros(image.shape[:2], bool)
  for color in colors:
    mask |= np.abs(image - _rgb(color)).max(-1) <= 2
  dark = image.max(-1) < 128
  heights = mask.sum(0)
  runs = _runs(heights > 0)
  if not runs:
    return []
  merged = [runs[0]]
  for a, b in runs[1:]:
    if a - merged[-1][1] <= 4 and dark[:, merged[-1][1]:a].any(0).all():
      merged[-1][1] = b
    else:
      merged.append([a, b])
  return [int(heights[a:b].max()) for a, b in merged]


def heatmap_cells(path, shape, cmap='viridis_r', vmin=0.0, vmax=100.0) -> np.ndarray:
  """The values of a heatmap's `shape` (rows, cols) cells, decoded from `cmap`'s colours: the
  median over each cell's pixels of that colour (a cell's printed number left out). The heatmap
  is the tallest block of such pixels, its leftmost part (thin white lines inside it are
  crossed); NaN for a cell without any."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  image = _image(path)
  table = np.round(matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)
  distance = np.abs(image[:, :, None, :] - table[None, None]).max(-1)
  index = distance.argmin(-1)
  mask = distance.min(-1) <= 2
  values = vmin + (index + 0.5) / 256 * (vmax - vmin)
  counts = mask.sum(1)
  row_runs = _runs(counts > 0.5 * counts.max())
  top, bottom = max(row_runs, key=lambda r: r[1] - r[0])
  columns = mask[top:bottom].sum(0) > 0.5 * (bottom - top)
  col_runs = _runs(columns)
  left, right = col_runs[0]
  for a, b in col_runs[1:]:
    if a - right > 8:
      break
    right = b
  rows, cols = shape
  cells = np.full(shape, np.nan)
  ys = np.linspace(top, bottom, rows + 1)
  xs = np.linspace(left, right, cols + 1)
  for i in range(rows):
    for j in range(cols):
      y0, y1 = int(ys[i] + 0.2 * (ys[i + 1] - ys[i])), int(ys[i + 1] - 0.2 * (ys[i + 1] - ys[i]))
      x0, x1 = int(xs[j] + 0.2 * (xs[j + 1] - xs[j])), int(xs[j + 1] - 0.2 * (xs[j + 1] - xs[j]))
      inside = mask[y0:y1, x0:x1]
      if inside.any():
        cells[i, j] = np.median(values[y0:y1, x0:x1][inside])
  return cells


def blobs(path, color) -> list[tuple[float, float]]:
  """The centre (x, y: pixels right, pixels down) of each blob of `color`, left to right."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  image = _image(path)
  labels, count = ndimage.label(np.abs(image - _rgb(color)).max(-1) <= 2)
  centres = ndimage.center_of_mass(np.ones_like(labels), labels, range(1, count + 1))
  return sorted((float(x), float(y)) for y, x in centres)


def check_bars(path, summaries) -> None:
  """The bars of report.plot_criticality's figure at `path`, read back from its pixels, are the
  criticality (%) of `summaries` in order: heights proportional to the values on the axes'
  fixed 0-102 % (within 2 px), the legend's stacked patches after them."""
  from lc_jax import report  # pylint: disable=g-import-not-at-top
  values = np.array([100 * s.criticality for s in summaries])
  heights = np.array(bars(path, list(report.KIND_COLORS.values())))
  assert len(heights) == len(values) + 1, (len(heights), len(values))
  heights = heights[:len(values)]
  scale = np.median(heights / values)  # pixels per %
  print(f'{len(values)} bars read back: {scale:.3g} px per %, largest miss '
        f'{np.abs(heights - scale * values).max():.2g} px')
  assert 300 < 102 * scale < 1000, 'the axes span 0-102 %'
  assert np.abs(heights - scale * values).max() <= 2
