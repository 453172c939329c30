"""The tumour score of a prediction: the mean over marker genes of each gene's z-score across the tiles (or spots)
of one prediction (population standard deviation). Genes constant over the tiles carry no ranking and are left
out. The default markers are `BREAST_TUMOUR_MARKERS` (SYNTHETIC_TUMOUR_MARKERS for the synthetic demo genes),
see `cmrcnet.data.markers`. predict-slide writes it; `cmrcnet.evaluation.localisation` evaluates it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from cmrcnet.data.markers import default_tumour_markers
from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

SCORE_KEY = "tumour_score"  # obs: tumour score of each tile/spot
TUMOUR_KEY = "tumour"  # obs: tumour_score >= threshold (when a threshold was given)
_CONSTANT_EPS = 1e-8  # a gene whose std over the tiles is below this is constant


def tumour_score(
    expr: np.ndarray, genes: Sequence[str], markers: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Mean z-score of the marker genes over the rows of `expr`.

    Args:
        expr: (N, G) log1p expression (predicted), rows = tiles or spots.
        genes: the G gene names.
        markers: marker genes; None = `default_tumour_markers(genes)`. Markers not in `genes` are skipped.

    Returns:
        (score (N,) float64, the markers used). Raises ConfigError when no marker is present and variable.
    """
    genes = [str(g) for g in genes]
    markers = default_tumour_markers(genes) if markers is None else [str(m) for m in markers]
    present = [m for m in markers if m in genes]
    if not present:
        raise ConfigError(
            f"none of the marker genes {markers} is among the model's {len(genes)} genes; "
            "give markers the model predicts (markers=), or train with them (include_genes=)"
        )
    col = {g: i for i, g in enumerate(genes)}
    x = np.asarray(expr, dtype=np.float64)[:, [col[m] for m in present]]  # (N, M)
    sd = x.std(axis=0)  # (M,)
    variable = sd > _CONSTANT_EPS
    if not variable.any():
        raise ConfigError(f"the marker genes {present} are constant over all {len(x)} tiles: no tumour score")
    if not variable.all():
        logger.warning(
            "marker genes constant over the tiles, left out of the score: %s",
            [m for m, v in zip(present, variable, strict=True) if not v],
        )
    z = (x[:, variable] - x[:, variable].mean(axis=0)) / sd[variable]  # (N, M')
    used = [m for m, v in zip(present, variable, strict=True) if v]
    missing = [m for m in markers if m not in genes]
    if missing:
        logger.info("marker genes not predicted by the model (skipped): %s", missing)
    return z.mean(axis=1), used
