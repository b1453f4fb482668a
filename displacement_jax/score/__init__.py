"""Scoring preference pairs by CHES and the baselines (the CLI is `python -m displacement_jax.score --config=...`).

main       the CLI (an entry point: nothing imports it): score, write the outputs, filter, resume
core       score_examples / score_pairs: bucketed, jitted, sharded CHES + baselines
outputs    summary, scores.jsonl, risky rows, histogram, the filtered subset, scores.partial.jsonl
filtering  the filter modes (lowest_k, quantile_window, ...) over a measure
"""
