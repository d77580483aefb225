"""The validator: every value of a merged config checked once, naming the key, before any
data is read.  Normalizes two spellings in place: channel lists and the reference's
`sites: [1, 2]` form."""
from __future__ import annotations

import os
import re

from shards.layout import LOADER_NORMS, N_SIRNAS, N_TREATMENTS, parse_channels
from shards import BACKENDS, SITE_MODES
from train.config_schema import (AMP_MODES, CRITERIA, DATASET_OF_PART, METRICS, MODELS,
                                 NUM_CLASSES_OF_PART, OPTIMIZERS, PRETRAINED_WORDS, ConfigError,
                                 stage_names)


def parse_channels_key(value, key: str) -> tuple[int, ...]:
    try:
        return parse_channels(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def validate(cfg: dict, part: str, where: str) -> None:
    _check_model(cfg, part, where)
    _check_args(cfg["args"], where)
    _check_state(cfg["stages"], where)
    _check_data(cfg["stages"]["data_params"], part, where)
    _check_stages(cfg, where)
    _check_plus(cfg, part, where)


def _check(cond, where, msg):
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_model(cfg, part, where):
    m, dp = cfg["model_params"], cfg["stages"]["data_params"]
    ch = parse_channels_key(dp["channels"], f"{where}: stages.data_params.channels")
    dp["channels"] = list(ch)
    _check(_is_int(m["n_channels"]) and m["n_channels"] == len(ch), where,
           f"model_params.n_channels is {m['n_channels']!r} but stages.data_params.channels "
           f"{list(ch)} has {len(ch)} channels; they must agree")
    _check(m["model"] in MODELS, where,
           f"model_params.model {m['model']!r} unknown; valid: {list(MODELS)}")
    _check(isinstance(m["model_name"], str) and m["model_name"], where,
           "model_params.model_name must be a timm model name, e.g. se_resnext50_32x4d")
    want = NUM_CLASSES_OF_PART[part]
    # Parts II/III may also classify the controls (the plus recipe's 1139; checked below).
    _check(m["num_classes"] == want or (part != "control" and m["num_classes"] == N_SIRNAS),
           where, f"model_params.num_classes is {m['num_classes']!r}; part {part!r} trains "
           f"{want} classes" + (f" ({N_SIRNAS} with stages.data_params.controls_as_classes)"
                                if part != "control" else ""))
    if m["pretrained"] is None:          # YAML null: the same as none
        m["pretrained"] = "none"
    p = m["pretrained"]
    _check(isinstance(p, str) and p, where,
           f"model_params.pretrained must be {' or '.join(PRETRAINED_WORDS)} or a path to a "
           "weights file")
    reads = part == "control" or str(cfg["args"]["pretrained_control"]).lower() in ("none", "null")
    if reads and p not in PRETRAINED_WORDS:   # only a run that does not start from Part I
        _check(os.path.isfile(p), where,
               f"model_params.pretrained: weights file {p} does not exist (or say imagenet / none)")
    _check(_is_num(m["drop_rate"]) and 0 <= m["drop_rate"] < 1, where,
           "model_params.drop_rate must be in [0, 1)")


def _check_args(a, where):
    fold = a["fold"]
    _check(_is_int(fold) and fold >= 0, where, f"args.fold must be an integer >= 0, got {fold!r}")
    _check(_is_int(a["seed"]), where, "args.seed must be an integer")
    _check(a["amp"] in AMP_MODES, where, f"args.amp {a['amp']!r} unknown; valid: {list(AMP_MODES)}")
    _check(a["channels_last"] in ("auto", True, False), where,
           "args.channels_last must be auto, true or false")
    _check(isinstance(a["device"], str) and re.match(r"^(auto|cpu|cuda(:\d+)?)$", a["device"]),
           where, f"args.device {a['device']!r} must be auto, cpu, cuda or cuda:N")
    for k in ("deterministic", "progress"):
        _check(isinstance(a[k], bool), where, f"args.{k} must be true or false")
    _check(isinstance(a["logdir"], str) and a["logdir"], where, "args.logdir must be a path")
    _check(not os.path.isfile(a["logdir"]), where,
           f"args.logdir {a['logdir']} is a file; give a directory (it is created if missing)")


def _check_state(s, where):
    sp, cp = s["state_params"], s["criterion_params"]
    _check(sp["main_metric"] in METRICS, where,
           f"stages.state_params.main_metric {sp['main_metric']!r} unknown; valid: {list(METRICS)}")
    _check(isinstance(sp["minimize_metric"], bool), where,
           "stages.state_params.minimize_metric must be true or false")
    _check(_is_int(sp["accumulation_steps"]) and sp["accumulation_steps"] >= 1, where,
           "stages.state_params.accumulation_steps must be an integer >= 1")
    _check(cp["criterion"] in CRITERIA, where,
           f"stages.criterion_params.criterion {cp['criterion']!r} unknown; valid: {list(CRITERIA)}")
    _check(_is_num(cp["smoothing"]) and 0 <= cp["smoothing"] < 1, where,
           "stages.criterion_params.smoothing must be in [0, 1)")


def _check_data(dp, part, where):
    for k in ("batch_size", "num_workers", "image_size"):
        lo = 0 if k == "num_workers" else 1
        _check(_is_int(dp[k]) and dp[k] >= lo, where,
               f"stages.data_params.{k} must be an integer >= {lo}, got {dp[k]!r}")
    _check(dp["valid_batch_size"] is None or (_is_int(dp["valid_batch_size"])
                                              and dp["valid_batch_size"] >= 1), where,
           "stages.data_params.valid_batch_size must be null or an integer >= 1")
    _check(dp["dataset"] == DATASET_OF_PART[part], where,
           f"stages.data_params.dataset is {dp['dataset']!r}, which is not the {part!r} part "
           f"(expected {DATASET_OF_PART[part]!r}); is this the right config file?")
    if isinstance(dp["sites"], list):  # the reference's form: [1] one site, [1, 2] both
        ref = sorted(dp["sites"])
        _check(ref in ([1], [2], [1, 2]), where,
               f"stages.data_params.sites {dp['sites']!r}: a list must be [1], [2] or [1, 2]")
        dp["sites"], dp["site"] = ("two", 1) if ref == [1, 2] else ("one", ref[0])
    _check(dp["sites"] in SITE_MODES, where,
           f"stages.data_params.sites {dp['sites']!r} unknown; valid: {list(SITE_MODES)}")
    _check(dp["site"] in (1, 2), where, "stages.data_params.site must be 1 or 2")
    _check(dp["norm"] in LOADER_NORMS, where,
           f"stages.data_params.norm {dp['norm']!r} unknown; valid: {list(LOADER_NORMS)}")
    _check(dp["backend"] in BACKENDS, where,
           f"stages.data_params.backend {dp['backend']!r} unknown; valid: {list(BACKENDS)}")
    # DALI needs at least one thread; found here, not after the store and model are set up.
    _check(not (dp["backend"] == "dali" and dp["num_workers"] == 0), where,
           "stages.data_params.backend dali needs stages.data_params.num_workers >= 1 "
           "(DALI threads); 0 works only with backend torch")
    for k in ("drop_last", "augment", "control_holdout"):
        _check(isinstance(dp[k], bool), where, f"stages.data_params.{k} must be true or false")
    for k in ("channel_dropout", "shear_p"):
        _check(_is_num(dp[k]) and 0 <= dp[k] <= 1, where,
               f"stages.data_params.{k} must be a probability in [0, 1]")
    _check(_is_num(dp["shear_deg"]) and 0 <= dp["shear_deg"] <= 45, where,
           "stages.data_params.shear_deg must be an angle in degrees in [0, 45]")
    for k in ("shards", "train_csv", "valid_csv"):
        _check(isinstance(dp[k], str) and dp[k], where, f"stages.data_params.{k} must be a path")


def _check_stages(cfg, where):
    s = cfg["stages"]
    names = stage_names(cfg)
    _check(names, where, "stages must define at least one stage (stage0, stage1, ...)")
    for name in names:
        _check_stage(s[name], f"stages.{name}", where)
    _check(sum(s[n]["state_params"]["num_epochs"] for n in names) >= 1, where,
           "the stages train for 0 epochs in total")


def _check_stage(st, key, where):
    ep = st["state_params"]["num_epochs"]
    _check(_is_int(ep) and ep >= 0, where, f"{key}.state_params.num_epochs must be an integer >= 0")
    _check(isinstance(st["freeze_backbone"], bool), where,
           f"{key}.freeze_backbone must be true or false")
    op = st["optimizer_params"]
    _check(op["optimizer"] in OPTIMIZERS, where,
           f"{key}.optimizer_params.optimizer {op['optimizer']!r} unknown; valid: {list(OPTIMIZERS)}")
    _check(_is_num(op["lr"]) and op["lr"] > 0, where,
           f"{key}.optimizer_params.lr must be > 0, got {op['lr']!r}")
    _check(_is_num(op["weight_decay"]) and op["weight_decay"] >= 0, where,
           f"{key}.optimizer_params.weight_decay must be >= 0")
    sch = st["scheduler_params"]
    if sch["scheduler"] == "MultiStepLR":
        _check(isinstance(sch["milestones"], list) and all(_is_int(x) and x >= 0
                                                           for x in sch["milestones"]),
               where, f"{key}.scheduler_params.milestones must be a list of epochs")
        _check(_is_num(sch["gamma"]) and sch["gamma"] > 0, where,
               f"{key}.scheduler_params.gamma must be > 0")
    elif sch["scheduler"] == "Cosine":
        seg = sch["segments"]
        _check(isinstance(seg, list) and len(seg) % 2 == 1 and all(_is_num(x) for x in seg)
               and all(x >= 0 for x in seg), where,
               f"{key}.scheduler_params.segments {seg!r}: [lr1, epoch1, lr2, epoch2, ..., lrN] "
               "(the 1st place's --lr cosine,...), numbers >= 0")
        breaks = seg[1::2]
        _check(all(b > a for a, b in zip([0] + breaks, breaks)), where,
               f"{key}.scheduler_params.segments: the epochs {breaks} must increase from > 0")
    elif sch["scheduler"] == "OneCycleLR":
        _check(_is_int(sch["num_steps"]) and sch["num_steps"] >= 1, where,
               f"{key}.scheduler_params.num_steps (epochs of the cycle) must be an integer >= 1")
        _check(_is_int(sch["warmup_steps"]) and sch["warmup_steps"] >= 0, where,
               f"{key}.scheduler_params.warmup_steps must be an integer >= 0")
        # A warm-up as long as the cycle leaves no annealing: said here, with the fix.
        _check(sch["warmup_steps"] < sch["num_steps"], where,
               f"{key}.scheduler_params.warmup_steps {sch['warmup_steps']} must be less than "
               f"num_steps {sch['num_steps']} (epochs of the cycle); for a cycle of "
               f"{sch['num_steps']} epoch(s) set --{key}.scheduler_params.warmup_steps="
               f"{max(sch['num_steps'] - 1, 0)}")
        for rk in ("lr_range", "momentum_range"):
            r = sch[rk]
            _check(isinstance(r, list) and len(r) == 2 and all(_is_num(x) for x in r), where,
                   f"{key}.scheduler_params.{rk} must be a list of two numbers")
        _check(all(x > 0 for x in sch["lr_range"]), where,
               f"{key}.scheduler_params.lr_range values must be > 0")
        _check(all(0 <= x < 1 for x in sch["momentum_range"]), where,
               f"{key}.scheduler_params.momentum_range values must be in [0, 1)")


def _check_plus(cfg, part, where):
    """The plus recipe's keys: each parsed by the module that reads it (which names the
    key), then the cross-checks between them."""
    from train.techniques.zoom import zoom_params
    from train.techniques.batch_augment import BatchAugment
    from train.techniques.heads import arcface_params, neck_params
    from train.techniques.pseudo_labels import PseudoSchedule
    m, dp = cfg["model_params"], cfg["stages"]["data_params"]
    _check(isinstance(cfg["plus"], bool), where, "plus must be true or false")
    tta = cfg["predict_params"]["tta"]
    _check(tta is None or tta in (1, 2, 4, 8), where,
           f"predict_params.tta {tta!r}: null or one of 1, 2, 4, 8")
    _check(isinstance(m["cell_type_input"], bool), where,
           "model_params.cell_type_input must be true or false")
    try:
        BatchAugment.from_params(jitter=dp["jitter"], cutmix=dp["cutmix"])
        zoom_params(dp["zoom"])
        arcface_params(m["arcface"])
        neck_params(m["neck"])
        pseudo = PseudoSchedule.from_params(dp["progressive_pseudo"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check(m["first_conv"] in ("copy_rgb", "new"), where,
           f"model_params.first_conv {m['first_conv']!r}: copy_rgb or new")
    bn = m["bn_momentum"]
    _check(bn is None or (_is_num(bn) and 0 < bn <= 1), where,
           f"model_params.bn_momentum {bn!r}: null or a number in (0, 1]")
    if pseudo is not None and pseudo.grow_epoch:
        last = cfg["stages"][stage_names(cfg)[-1]]["scheduler_params"]["scheduler"]
        _check(last in ("Cosine", "none"), where,
               "stages.data_params.progressive_pseudo.grow_epoch needs a schedule that follows "
               f"the fractional epoch (Cosine or none) in the last stage, not {last}; or set "
               "grow_epoch: false")
    plus_model = ("put the overlay (configs/plus.yml) after configs that set another "
                  "model, e.g. --overrides configs/tiny.yml,configs/plus.yml")
    for key, on in (("cell_type_input", m["cell_type_input"]),
                    ("neck", neck_params(m["neck"]) is not None),
                    ("arcface", arcface_params(m["arcface"]) is not None)):
        _check(not on or m["model"] == "cell_plus", where,
               f"model_params.{key} needs model_params.model: cell_plus (it is "
               f"{m['model']!r}); {plus_model}")
    _check(isinstance(dp["controls_as_classes"], bool), where,
           "stages.data_params.controls_as_classes must be true or false")
    if dp["controls_as_classes"]:
        _check(part != "control", where, "stages.data_params.controls_as_classes is for Parts "
               "II/III (finetune, pseudo); Part I classifies the controls already")
        _check(m["num_classes"] == N_SIRNAS, where,
               f"stages.data_params.controls_as_classes needs model_params.num_classes "
               f"{N_SIRNAS} (the siRNAs and the controls), not {m['num_classes']!r}")
    elif part != "control":
        _check(m["num_classes"] == N_TREATMENTS, where,
               f"model_params.num_classes {m['num_classes']!r}: {N_SIRNAS} classes need "
               "stages.data_params.controls_as_classes: true")
    _check(dp["progressive_pseudo"] in (None, False) or part != "control", where,
           "stages.data_params.progressive_pseudo is for Parts II/III (finetune, pseudo)")
