"""Preference training, one job per module (the CLI is `python -m displacement_jax.train --config=...`).

main        the CLI (an entry point: nothing imports it); config.main -> a pipeline's run(config)
loop        run(config, resume) -> RunResult: the training loop as named steps
step        TrainState, the loss and the jitted train step (gradient accumulation, NaN-safe)
optim       optimizers and learning-rate schedules
reference   the reference log-prob pass and its on-disk cache
checkpoint  orbax checkpoints: save, verify, restore
monitor     the displacement monitor on the fixed subset, and its warnings
metrics     metrics.jsonl, TensorBoard, the progress bar
plot        output_dir/displacement.png from metrics.jsonl
"""
