"""Plain-text tables of LayerSummary lists: the most and least critical layers of each model, and
one line per model."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lc_jax.report.stats import LayerSummary, UNKNOWN_SET, by_model, finite_mean, image_sets
from lc_jax.report.stats import nonfinite_note


def _pct(value: float, width: int, digits: int = 1, sign: str = '') -> str:
  if not np.isfinite(value):
    return f'{"-":>{width}s}'
  return f'{sign}{100 * value:.{digits}f}'.rjust(width)


def _layer_lines(layers: Sequence[LayerSummary], name_width: int) -> list[str]:
  lines = [f'  {"layer":{name_width}s} {"kind":14s} {"stage":8s} {"crit %":>7s} '
           f'{"±trials %":>9s} {"±images %":>9s} {"recov %":>8s} {"agree %":>8s}']
  for s in layers:
    lines.append(f'  {s.layer:{name_width}s} {s.kind:14s} {s.stage:8s} '
                 f'{_pct(s.criticality, 7)} {_pct(s.ci_trials, 9, sign="±")} '
                 f'{_pct(s.ci_images, 9, 2, sign="±")} {_pct(s.recovered_acc, 8)} '
                 f'{_pct(s.pred_agreement, 8)}')
  return lines


def _trials_note(layers: Sequence[LayerSummary]) -> str | None:
  both = [s for s in layers if np.isfinite(s.ci_trials) and np.isfinite(s.ci_images)]
  wider = sum(s.ci_trials > s.ci_images for s in both)
  if both and wider > len(both) / 2:
    trials = max(s.trials for s in layers)
    return (f'note: the interval over trials is wider than the one over images for {wider} of '
            f'{len(both)} layers: the draw of the fresh weights dominates, and {trials} trials '
            'may not be enough (raise the number of trials).')
  return None


def table(summaries: Sequence[LayerSummary], top: int = 10) -> str:
  """The `top` most and least critical layers of each model, as printable text.

  Columns: criticality (%), its 95% intervals over trials and over images (percentage points),
  recovered top-1 (% of the original's) and top-1 agreement with the original (%), each 100
  times the fraction results.csv holds. Each model's image set is named when the summaries
  span several.
  """
  out = []
  several = len(image_sets(s.dataset for s in summaries)) > 1
  for model, layers in by_model(summaries).items():
    trials = max(s.trials for s in layers)
    how = f'{layers[0].mode}, ' if layers[0].mode else ''  # the reset mode, and the set
    if several:
      how += f'on {layers[0].dataset or UNKNOWN_SET}, '
    top1 = layers[0].original_top1
    labelled = f'original top-1 {top1:.2f}%' if np.isfinite(top1) else 'no labels'
    ranked = sorted((s for s in layers if np.isfinite(s.criticality)),
                    key=lambda s: -s.criticality)
    not_finite = nonfinite_note(layers)
    out.append(f'{model}: {how}{len(layers)} layers, {trials} trial{"s" * (trials != 1)}, '
               f'{labelled}; mean criticality '
               f'{_pct(finite_mean(s.criticality for s in layers), 0)}%'
               + (f' of {len(ranked)} layers' if not_finite else ''))
    shown = ranked if len(ranked) <= 2 * top else ranked[:top] + ranked[-top:]
    width = max([12] + [len(s.layer) for s in shown])
    if len(ranked) <= 2 * top:
      out.append(f' all {len(ranked)} layers, most critical first:')
      out += _layer_lines(ranked, width)
    else:
      out.append(f' most critical {top}:')
      out += _layer_lines(ranked[:top], width)
      out.append(f' least critical {top}:')
      out += _layer_lines(ranked[-top:], width)
    if not_finite:
      out.append(f' not finite, left out of the means (and of the ranking when no trial is '
                 f'finite): {not_finite}')
    interval_text = (f'Student t over {trials} trials' if trials >= 2 else
                     'none with one trial')
    out.append(f' 95% intervals: ±trials {interval_text}; ±images over the images, '
               'mean over trials.')
    out.append(' units: crit, recov and agree are 100 x the fractions criticality, recovered_acc '
               "(top-1 as a share of the original's)")
    out.append('  and pred_agreement of results.csv; its top1_acc and top5_acc are in % already.')
    note = _trials_note(layers)
    if note:
      out.append(' ' + note)
    out.append('')
  return '\n'.join(out).rstrip('\n')


def model_table(summaries: Sequence[LayerSummary]) -> str:
  """One line per model: layers, trials, mean criticality over layers (%), original top-1, and
  the image set when the summaries span several."""
  grouped = by_model(summaries)
  notes = {model: nonfinite_note(layers) for model, layers in grouped.items()}
  marks = any(notes.values())  # a column for the mark: '*' where a mean leaves trials out
  width = max(5, *(len(m) for m in grouped))
  several = len(image_sets(s.dataset for s in summaries)) > 1
  lines = [f'{"model":{width}s} {"layers":>6s} {"trials":>6s} {"mean crit %":>11s} '
           f'{"top-1 %":>8s}' + ('  image set' if several else '')]
  for model, layers in grouped.items():
    top1 = layers[0].original_top1
    mean = finite_mean(s.criticality for s in layers)
    mean_text = (_pct(mean, 10) + ('*' if notes[model] else ' ')) if marks else _pct(mean, 11)
    lines.append(f'{model:{width}s} {len(layers):6d} {max(s.trials for s in layers):6d} '
                 f'{mean_text} {f"{top1:.2f}" if np.isfinite(top1) else "-":>8s}'
                 + (f'  {layers[0].dataset or UNKNOWN_SET}' if several else ''))
  lines += [f'* not finite, left out of the mean: {model}: {note}'
            for model, note in notes.items() if note]
  return '\n'.join(lines)
