"""`python -m train control|finetune|pseudo [--config configs/<part>.yml] [options] [--dotted.key=value ...]`

Options: --channels "[1,2,3,4,5]"|"[1,2,3,4,5];[1,2,3,5,6]"|all   --fold 0|0,1|all
         --model-name NAME   --logdir DIR   --shards DIR (the store)
         --overrides configs/tiny.yml (YAML merged on top; several: a,b in order, later wins)
         --n-folds 5 (for --fold all)
Any other --a.b.c=value sets that config key, e.g. --stages.data_params.batch_size=8.
Each option and key is given once. Config paths are read from the working directory,
else from the project.
Multi-GPU / multi-node: torchrun --nproc_per_node=N -m train finetune ...
(stages.data_params.batch_size is the global batch: each process takes batch_size / N).
"""
from common.cli import run_commands


def _run(part, config, channels, fold, model_name, logdir, shards, overrides, n_folds, dotted):
    from train.runs import run
    # The runs print their own progress; their result dicts are for library callers.
    run(part, config, channels=channels, fold=fold, model_name=model_name, logdir=logdir,
               shards=shards, overrides=overrides, n_folds=n_folds, dotted=dotted)


def control(config: str = "configs/control.yml", channels=None, fold=None,
            model_name: str | None = None, logdir: str | None = None, shards: str | None = None,
            overrides: str | None = None, n_folds=5, **dotted):
    """Part I: 31 control siRNAs on the control wells of train and test."""
    return _run("control", config, channels, fold, model_name, logdir, shards, overrides,
                n_folds, dotted)


def finetune(config: str = "configs/finetune.yml", channels=None, fold=None,
             model_name: str | None = None, logdir: str | None = None, shards: str | None = None,
             overrides: str | None = None, n_folds=5, **dotted):
    """Part II: 1108 siRNAs per fold, from the control model of the same subset."""
    return _run("finetune", config, channels, fold, model_name, logdir, shards, overrides,
                n_folds, dotted)


def pseudo(config: str = "configs/pseudo.yml", channels=None, fold=None,
           model_name: str | None = None, logdir: str | None = None, shards: str | None = None,
           overrides: str | None = None, n_folds=5, **dotted):
    """Part III: as Part II on train + pseudo-labelled test wells."""
    return _run("pseudo", config, channels, fold, model_name, logdir, shards, overrides,
                n_folds, dotted)


for _f in (control, finetune, pseudo):
    _f.__doc__ += "\n\n" + __doc__


def main(argv=None):
    return run_commands("train", {"control": control, "finetune": finetune, "pseudo": pseudo},
                        argv, doc=__doc__)


if __name__ == "__main__":
    main()
