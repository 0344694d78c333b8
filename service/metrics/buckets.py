"""Names and fixed bucket bounds shared by every metric family (`service.metrics`)."""

from __future__ import annotations

PREFIX = "hydra"
MAX_CLASS_LABELS = 50
OTHER_CLASS = "other"
REJECT_REASONS = ("queue_full", "deadline", "disconnected")
UNMATCHED_ROUTE = "unmatched"

# Fixed buckets. p-values are uniform on [0, 1] under no shift whatever the model, so equal-width
# buckets above 0.1 give a flat heatmap; the fine buckets at the bottom contain the usual α values
# (p ≤ α is exactly the bucket `le=α`, the same inequality the flag uses).
P_VALUE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Mutual information in nats lies in [0, log K]; log-spaced buckets resolve the small ID values.
MUTUAL_INFORMATION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Feature density = squared Mahalanobis distance of the body features: ~ the body width (64–256) on
# ID rows, orders of magnitude more far from the data; log-spaced at 1-2-3-5-7 per decade to 1e6.
DENSITY_BUCKETS = (0.1, 0.2, 0.5, *(float(f"{m}e{e}") for e in range(6) for m in (1, 2, 3, 5, 7)), 1e6)
# Input typicality = squared Mahalanobis distance of the standardised raw row: ~ χ²_d on ID rows, d the
# number of features (2 … 784: medians ~1.4 … ~783), far *below* that on rows scaled towards the mean
# (×0.1: ~d/100) and far above on rows far out; log-spaced 0.01 … 1e6 at 1-2-3-5-7 per decade.
INPUT_DENSITY_BUCKETS = (*(float(f"{m}e{e}") for e in range(-2, 6) for m in (1, 2, 3, 5, 7)), 1e6)
# Classification vote disagreement is the fraction of heads disagreeing with the mean: [0, 1].
VOTE_DISAGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Regression disagreement is the std of head means in target units: scale unknown, so log-spaced wide.
SPREAD_BUCKETS = tuple(float(f"{m}e{e}") for e in range(-3, 4) for m in (1, 2, 5))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
