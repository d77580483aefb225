"""`python -m train control|finetune|pseudo [--config configs/<part>.yml] [options] [--dotted.key=value ...]`

Options: --channels "[1,2,3,4,5]"|"[1,2,3,4,5];[1,2,3,5,6]"|all   --fold 0|0,1|all
         --model-name NAME   --logdir DIR   --shards DIR (the store)
         --overrides configs/tiny.yml (YAML merged on top; several: a,b in order, later wins)
         --n-folds 5 (for --fold all)
Any other --a.b.c=value sets that config key, e.g. --stages.data_params.batch_size=8.
Config paths are read from the working directory, else from the project.
Multi-GPU / multi-node: torchrun --nproc_per_node=N -m train finetune ...
(stages.data_params.batch_size is the global batch: each process takes batch_size / N).
"""
import sys

import fire

from common.errors import BadInput, run_cli


def _command(part):
    def command(config=f"configs/{part}.yml", channels=None, fold=None, model_name=None,
                logdir=None, shards=None, overrides=None, n_folds=5, **dotted):
        from train.runs import run
        if dotted.pop("help", None) or dotted.pop("h", None):
            print(command.__doc__)   # **dotted would otherwise swallow --help
            return
        run_cli(lambda: _refuse_repeated("--overrides") or run(part, config, channels=channels, fold=fold, model_name=model_name,
                            logdir=logdir, shards=shards, overrides=overrides, n_folds=n_folds,
                            dotted=dotted))
    command.__name__ = part
    command.__doc__ = {
        "control": "Part I: 31 control siRNAs on the control wells of train and test.",
        "finetune": "Part II: 1108 siRNAs per fold, from the control model of the same subset.",
        "pseudo": "Part III: as Part II on train + pseudo-labelled test wells.",
    }[part] + "\n\n" + __doc__
    return command


def _refuse_repeated(option):
    # fire keeps only the last of a repeated option: the overlay would be dropped silently.
    given = [a for a in sys.argv[1:] if a == option or a.startswith(option + "=")]
    if len(given) > 1:
        raise BadInput(f"{option} given {len(given)} times; fire keeps only the last. Give the "
                       f"files once, comma-separated, in order: {option} "
                       "configs/tiny.yml,configs/plus.yml")


def main():
    fire.Fire({p: _command(p) for p in ("control", "finetune", "pseudo")})


if __name__ == "__main__":
    main()
