"""Helpers shared by prep, train, infer, demo and bench that are not data (data lives in shards):
errors (the one CLI error policy), arglists (channel/fold list options), run_layout (where runs
and predictions live), precision (the AMP choice), well_logits (sites -> wells), distributed."""
