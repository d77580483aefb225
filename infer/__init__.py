"""Inference: predict-all, ensemble with the plate constraint, pseudo-labels, score.

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
