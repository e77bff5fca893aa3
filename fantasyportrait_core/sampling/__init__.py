"""Flow-matching sampling: schedules, presets and samplers, dual guidance, context windows for long
videos, generation around the sampler (VAE encode/decode)."""
