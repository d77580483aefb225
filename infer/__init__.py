"""Inference: predict-all, ensemble with the plate constraint, pseudo-labels, score, embed, map.

`python -m infer COMMAND --help`.  Modules, one job each:

- `predictions` the prediction files (pred_<split>.npy, ids, meta): written, found, read
- `wells`    the test wells in the source's order; wells parsed from id_codes
- `groups`   siRNA plate groups from the train labels; each test plate's group
- `assign`   one-to-one (Hungarian) assignment of a plate's wells to its group
- `ensemble` average logit files, apply the plate constraint, write submission.csv
- `pseudo`   confident assigned test wells -> Part III train/valid CSVs
- `truth`    the test labels to score against (release metadata.csv, test_truth.csv)
- `score`    accuracy of a submission, of test or of validation logits, per cell type
- `predict`  stream the store through every checkpoint (imports torch)
- `embed`    every well of the store through one run: its embeddings (imports torch)
- `embeddings` the embeddings directory (embeddings.zarr, wells.csv, embed.json)
- `align`    batch alignment on the control wells: none, center_scale, tvn
- `map_metrics` replicate mAP (copairs), batch leakage, recall of known relations
- `map`, `map_figures` aligned -> profiles -> similarity, metrics, table and figures
"""

from common.errors import BadInput


class InferError(BadInput):
    """Bad input to inference: names the file, plate or id_code and what is wrong."""


def score_submission(submission, truth) -> dict:
    """Accuracy of a submission.csv against the test labels (a release metadata.csv,
    test_truth.csv, or a data directory holding one; see `infer.truth`), for the demo."""
    from infer.score import score_submission as _score
    return _score(submission, truth)


__all__ = ["InferError", "score_submission"]
