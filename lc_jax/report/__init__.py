r"""Tables and figures of layer criticality, from the runner's results.csv or the paper's.

    python -m lc_jax.report OUT1 OUT2 ... [--out DIR] [--top 10]
    python -m lc_jax.report --compare PAPER_CSV OUT1 OUT2 ...   # ours against the paper's
    python -m lc_jax.report --claims OUT1 OUT2 ...              # the paper's statements, tested
    python -m lc_jax.report --diff A B                          # B - A per layer, paired intervals

Each argument is a workdir holding results.csv, a sweep's folder (every finished model in it), or
a results CSV itself: the runner's, or the paper's released raw-results/results.csv (github.com/paulgavrikov/layer_criticality), which holds
many models in one file. Writes DIR/heatmap.png (models x layers, the paper's Figure 1) and
DIR/scatter.png (original top-1 against mean criticality), and prints a table per model. Results
of several image sets (results.csv's dataset) get those figures per set and DIR/datasets.png
(a model's criticality per set side by side).

In a notebook or the runner:

    rows = report.load('OUT')                 # one dict per (trial, layer), file order kept
    summaries = report.summarize(rows)        # one LayerSummary per (model, layer)
    print(report.table(summaries))
    report.plot_criticality(summaries, 'OUT/criticality.png')

Intervals are 95%. Across trials: mean +- t_{0.975, n-1} * sd / sqrt(n) (Student t, sample sd),
none with one trial. Across images: the runner's criticality_ci_images (a normal interval of one
trial's mean over the images), averaged over the trials.

Modules: read (CSVs and per-image values in), stats (summaries, intervals, the bootstrap and the
permutation test), categories (the zoo's or the user's), claims (the paper's statements), diff
(two runs or models), text (tables), figures (matplotlib), compare (ours against the paper's
results), cli (the command and run.py's per-workdir report). docs/statistics.md has the formulas.
"""

from lc_jax.errors import UserError
from lc_jax.report import categories
from lc_jax.report import claims
from lc_jax.report import diff
from lc_jax.report.cli import write_workdir_report
from lc_jax.report.compare import compare
from lc_jax.report.compare import comparison_table
from lc_jax.report.figures import KIND_COLORS
from lc_jax.report.figures import layer_union
from lc_jax.report.figures import plot_criticality
from lc_jax.report.figures import plot_datasets
from lc_jax.report.figures import plot_diff
from lc_jax.report.figures import plot_heatmap
from lc_jax.report.figures import plot_profiles
from lc_jax.report.figures import plot_scatter
from lc_jax.report.figures import plot_study
from lc_jax.report.read import ALIASES
from lc_jax.report.read import clean_layer_name
from lc_jax.report.read import guess_kind
from lc_jax.report.read import load
from lc_jax.report.read import per_image_of
from lc_jax.report.read import resolve
from lc_jax.report.read import results_of
from lc_jax.report.read import STAGE_PATTERN
from lc_jax.report.read import WRAPPER_PREFIXES
from lc_jax.report.stats import by_model
from lc_jax.report.stats import interval
from lc_jax.report.stats import LayerSummary
from lc_jax.report.stats import model_points
from lc_jax.report.stats import spearman
from lc_jax.report.stats import summarize
from lc_jax.report.text import model_table
from lc_jax.report.text import table
