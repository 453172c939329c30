"""Pathology foundation models as image encoders: vendor architectures and weight layouts in plain PyTorch.

`FOUNDATION_SPECS` is the registry (one `FoundationSpec` per model); `models.encoders.ARCHITECTURES` holds an
entry for each, so `--encoder uni` works like `--encoder resnet50`. The weights are never downloaded: users point
`--encoder-weights` at the file or folder they have, and `check_weights_file` tells them at once when it does not
fit.
"""

from __future__ import annotations

from cmrcnet.models.foundation.loading import check_weights_file, resolve_weights_path
from cmrcnet.models.foundation.registry import FOUNDATION_SPECS, FoundationSpec

__all__ = ["FOUNDATION_SPECS", "FoundationSpec", "check_weights_file", "resolve_weights_path"]
