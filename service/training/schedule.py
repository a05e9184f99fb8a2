"""The learning rate of each step: a pure function of the step, so a resumed run takes the
very rates an uninterrupted one would, with nothing to checkpoint.

Steps count from 1. A linear warm-up reaches the base rate at step `warmup_steps`; after it,
`constant` keeps the base rate, `cosine` anneals it to `min_learning_rate` at the last step
(as PyTorch's CosineAnnealingLR), `step` multiplies it by `decay_factor` every `decay_every`
steps (as PyTorch's StepLR).
"""

import math

from shardprop.service.config import TrainConfig


def learning_rate(config: TrainConfig, step: int) -> float:
    base, warmup = config.learning_rate, config.warmup_steps
    if step <= warmup:
        return base * step / warmup
    after = step - warmup  # steps since the warm-up, from 1
    if config.schedule == "cosine":
        span = max(config.steps - warmup, 1)
        progress = min((after - 1) / max(span - 1, 1), 1.0)
        low = config.min_learning_rate
        return low + (base - low) * (1 + math.cos(math.pi * progress)) / 2
    if config.schedule == "step":
        assert config.decay_every is not None  # the config requires it
        return base * config.decay_factor ** ((after - 1) // config.decay_every)
    return base
