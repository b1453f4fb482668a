"""The displacement audit: predict per pair, before training, how a configured run moves ln pi(y+).

replay   the kernels of the replay route (updates replayed at theta0, first order by JVP, the model at theta0 + D)
main     the CLI, `python -m displacement_jax.audit --config=...` (an entry point: nothing imports it)
"""
