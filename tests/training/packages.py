"""A Hydra net packaged as `model.onnx` is, for tests that export one by hand."""

from __future__ import annotations

import numpy as np

from training.density import fit_feature_density, fit_input_density, fit_unseen_values
from training.models import HydraNet, PackagedModel


def classifier_with_scores(net: HydraNet, rows: np.ndarray, labels: np.ndarray) -> PackagedModel:
    """`net` (classification) with the feature density, the input typicality and the unseen-value
    count fitted on its training `rows` (classes `labels`), as the pipeline packages the student."""
    return PackagedModel(
        [net],
        "classification",
        density=fit_feature_density(net, rows, labels),
        input_density=fit_input_density(rows),
        unseen_values=fit_unseen_values(rows),
    )
