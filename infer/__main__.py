"""`python -m infer COMMAND --help` — predict-all, ensemble, pseudo-labels, score, embed, map.

    python -m infer predict-all --shards OUT --model-root LOGS/finetune --model-name NAME \\
        --out-dir PRED [--tta 1|2|8 (default: the run's)] [--batch-size 64] [--split test|valid] [--data-dir DATA] \\
        [--amp auto|bf16|fp16|none] [--overwrite] [--allow-unfinished]
    python -m infer ensemble --data-dir DATA --predict-root PRED [--model-names a,b] \\
        [--extra-logits f.npy,g.npy] [--out submission.csv] [--no-assign] [--temperature 1] \\
        [--model-root LOGS/finetune] [--allow-missing]
    python -m infer pseudo-labels --data-dir DATA --predict-root PRED --folds-dir csv \\
        --out-dir csv/pseudo [--min-confidence 0.5] [--confidence group|full]
    python -m infer score --submission submission.csv --truth DATA/metadata.csv|DATA/test_truth.csv
    python -m infer score --predict-root PRED --split test --truth DATA/metadata.csv [--data-dir DATA]
    python -m infer score --predict-root PRED --split valid --folds-dir csv
    python -m infer embed --shards OUT --run LOGS/<part>/[ch]/[fold_k/]<model> --out EMB \
        [--labels DATA/metadata.csv|submission.csv] [--tta 1|2|8] [--batch-size 32]
    python -m infer map --embeddings EMB --out MAP [--relations DATA/relations.csv] \
        [--alignments none,center_scale,tvn]

Bad input exits with status 2 and one line naming the file, plate or id_code.
"""
from common.cli import run_commands


def predict_all(shards, model_root, model_name, out_dir, tta: int | None = None, batch_size=32,
                split="test", data_dir: str | None = None, folds=None, channels=None, device=None,
                backend="auto", overwrite=False, amp: str | None = None, allow_unfinished=False):
    """Logits of every [channels]/fold_k/<model_name> checkpoint under model_root.

    Writes OUT_DIR/[channels]/fold_k/<model_name>/pred_<split>.npy (float32,
    one row per well: for test the data directory's order - test.csv's rows, or the
    release metadata.csv's; pass --data-dir for it, else the store's experiment/plate/well
    order - and the fold's valid CSV order for valid) with ids_<split>.csv beside it. Both
    sites are
    averaged; --tta 2 adds the horizontal flip, --tta 8 the dihedral group
    (default: the run's own predict_params.tta; 8 for runs of configs/plus.yml, else 1).
    A run trained on 1139 classes (controls as classes) keeps its first 1108 columns.
    Under torchrun every rank predicts its part and rank 0 writes.
    --folds 0,1 / --channels "[1,2,3,4,5]" (or "[1,2,3,4,5];[1,2,3,5,6]", all)
    restrict the runs; --overwrite redoes runs whose output exists (they are
    skipped otherwise). --amp (auto, bf16, fp16, none) defaults to each run's
    own training setting; auto is bf16 only where the device computes it natively.
    Runs without checkpoints/finished.json are refused; --allow-unfinished predicts their
    best.pth so far (recorded in pred_<split>.json). An existing prediction whose checkpoint
    changed since (or whose ids no longer match the store) is predicted again.
    """
    from infer.predict import predict_all as run
    return run(shards, model_root, model_name, out_dir, tta=tta, batch_size=batch_size,
               split=split, data_dir=data_dir, folds=folds, channels=channels, device=device,
               backend=backend, overwrite=overwrite, amp=amp, allow_unfinished=allow_unfinished)


def ensemble(data_dir, predict_root: str | None = None, model_names=None, extra_logits=None,
             out: str | None = None, no_assign=False, temperature=1.0, min_margin=0.05,
             model_root: str | None = None, allow_missing=False, overwrite=False):
    """Average logits (subsets, folds, models, extra files), softmax, plate-constrained assignment.

    Writes OUT (default PREDICT_ROOT/submission.csv) in sample_submission order
    (without one, as in the release layout, in the source's test order),
    plus OUT.probs.npy / OUT.ids.csv (averaged probabilities) and OUT.plates.csv
    (plate, inferred group, margin, wells). Plates whose top-two group scores
    differ by less than --min-margin are reported as ambiguous.

    Members: every [channels]/fold_k/<model> folder under PREDICT_ROOT (of the
    --model-names when given) is expected to hold pred_test.npy, and with
    --model-root LOGS/<part> so is every run there with checkpoints/best.pth.
    A member without it (a predict-all that stopped early or never ran) is an
    error listing them all; --allow-missing ensembles the rest with a warning.
    An existing OUT (or its sidecars) is replaced only with --overwrite.
    """
    from infer.ensemble import ensemble as run
    return run(data_dir, predict_root, model_names=model_names, extra_logits=extra_logits,
               out=out, assign=not no_assign, temperature=temperature, min_margin=min_margin,
               model_root=model_root, allow_missing=allow_missing, overwrite=overwrite)


def pseudo_labels(data_dir, predict_root, folds_dir, out_dir, min_confidence=0.5,
                  model_names=None, extra_logits=None, temperature=1.0, min_margin=0.05,
                  confidence="group", allow_missing=False, overwrite=False):
    """Part III CSVs: each fold's train rows + test wells whose assigned siRNA has p >= min_confidence.

    --confidence group (default) measures p within the plate's siRNA group; full uses the plain
    softmax. OUT_DIR must not be FOLDS_DIR (nor a link to it). Missing predictions are an error
    as in `ensemble`, unless --allow-missing. Existing CSVs in OUT_DIR are replaced only
    with --overwrite.
    """
    from infer.pseudo import pseudo_labels as run
    return run(data_dir, predict_root, folds_dir, out_dir, min_confidence=min_confidence,
               model_names=model_names, extra_logits=extra_logits, temperature=temperature,
               min_margin=min_margin, confidence=confidence, allow_missing=allow_missing,
               overwrite=overwrite)


def score(submission: str | None = None, truth: str | None = None,
          predict_root: str | None = None, split="valid", folds_dir: str | None = None,
          data_dir: str | None = None, model_names=None, temperature=1.0, min_margin=0.05):
    """Top-1 accuracy overall, per cell type and per experiment, with and without the plate
    assignment.

    --truth: the test labels - the rxrx.ai release's metadata.csv (its test labels are
    public), test_truth.csv of synthetic data, any id_code,sirna CSV, or a data directory
    holding metadata.csv or test_truth.csv. With --submission: that file (and the plain
    argmax from the probabilities the ensemble wrote beside it). With --predict-root and
    --split test: every run's test logits and their ensemble, the plate groups from the
    train labels of --data-dir (default: the directory of the truth file). With
    --predict-root and --split valid: the validation logits against --folds-dir's labels.
    """
    from infer.score import score as run
    return run(submission=submission, truth=truth, predict_root=predict_root, split=split,
               folds_dir=folds_dir, model_names=model_names, temperature=temperature,
               min_margin=min_margin, data_dir=data_dir)


def embed(shards, run, out, labels=None, tta=None, batch_size=32, device=None, backend="auto",
          amp=None, overwrite=False):
    """One embedding per well of the store (train, test, controls) from one trained run.

    The embedding is the layer the classifier reads (a plus model's neck, else the
    backbone's pooled features), averaged over the two sites (and the TTA views: default
    the run's, as predict-all). Writes OUT/embeddings.zarr (float32, n_wells x d) and
    OUT/wells.csv (id_code, experiment, plate, well, cell_type, well_type, sirna). sirna
    comes from the store (train and controls) and, for test wells, from --labels: the
    release's metadata.csv (public test labels), test_truth.csv, or a submission.csv.
    --run is a run folder holding checkpoints/best.pth, or a checkpoint. Resumable (one
    experiment at a time); --overwrite starts again. Under torchrun rank 0 writes.
    """
    from infer.embed import embed as run_embed
    return run_embed(shards, run, out, labels=labels, tta=tta, batch_size=batch_size,
                     device=device, backend=backend, amp=amp, overwrite=overwrite)


def map(embeddings, out, relations=None, alignments="none,center_scale,tvn", null_size=10000,
        seed=0, figures=True):
    """A phenomic map from `infer embed`'s output, scored, under each alignment.

    Align (none; center_scale: per plate on its control wells; tvn: whitening fitted on
    the control wells, then each experiment's control covariance aligned), aggregate per
    siRNA x cell type and per siRNA, relate by cosine similarity. Writes per alignment
    OUT/<alignment>/{aligned.npy, profiles.csv, profiles.npy, similarity.npy}, and
    OUT/metrics.json, OUT/metrics.md and the figures (OUT/*.png). Metrics: replicate mAP
    across experiments (copairs; mean, fraction significant at FDR 5 %) within and across
    cell types, batch leakage (controls retrieving their own experiment; lower is better)
    and, with --relations (sirna_a,sirna_b[,family]), the recall of those pairs among the
    top and bottom 5 % of similarities (chance 0.10).
    """
    from infer.map import phenomic_map
    return phenomic_map(embeddings, out, relations=relations, alignments=alignments,
                        null_size=null_size, seed=seed, figures=figures)


COMMANDS = {"predict-all": predict_all, "ensemble": ensemble,
            "pseudo-labels": pseudo_labels, "score": score, "embed": embed, "map": map}


def main(argv=None):
    return run_commands("infer", COMMANDS, argv, doc=__doc__)


if __name__ == "__main__":
    main()
