SETUP = r'''from course_lib.transfer import TRANSFER_DEFAULTS as CFG
from course_lib.transfer import one_hot_features, source_task, target_task

source = source_task(seed)  # Split: X_* long (n, T) token ids, y_* long (n,)
target = target_task(seed)
MODEL = dict(CFG["model"])  # TinyTransformer(**MODEL) in token mode
LORA_TARGETS, LORA_R, LORA_ALPHA = tuple(CFG["lora_targets"]), CFG["lora_r"], CFG["lora_alpha"]
PRETRAIN = dict(epochs=CFG["source_epochs"][fast], lr=CFG["source_lr"], scheduler="cosine", warmup_ratio=0.05)
ADAPT = dict(epochs=CFG["target_epochs"][fast], lr=CFG["lr"], scheduler="cosine", warmup_ratio=0.05)
STRATEGY_FIT = {  # fit settings per strategy (same epochs and schedule; the LR goes with what is trainable)
    "frozen_head": dict(ADAPT, lr=CFG["frozen_lr"]),
    "partial_unfreeze": dict(ADAPT, backbone_lr=CFG["backbone_lr"]),
    "adapter": dict(ADAPT),
}'''
