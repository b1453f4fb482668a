"""Configs on the command line and before a run.

flags      --config=FILE[:ARG] and --config.x=... parsing, --help of the given config, one-line errors
checks     check_common / check_train / check_score (before any model is loaded), resume_changes
sweep      a config's get_sweep(): the runs of a sweep
trl_names  TRL's DPOConfig flag names mapped onto config fields
"""
