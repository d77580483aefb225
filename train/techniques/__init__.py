"""What the plus and first recipes add to the reference trainer, each a switch of its own:
the 1st place's head (neck, cell type, ArcFace: heads, losses), batch augmentation
(CutMix, jitter), the zoom key, and progressive pseudo labels (pseudo_labels, pseudo_run).
The reference trainer (train.recipe, stages, schedule, data, models) runs without them."""
