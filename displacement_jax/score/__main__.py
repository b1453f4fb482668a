"""`python -m displacement_jax.score --config=...`: see displacement_jax/score/main.py."""

import sys

from displacement_jax.score import main

sys.exit(main.main())
