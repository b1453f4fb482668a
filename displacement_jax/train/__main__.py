"""`python -m displacement_jax.train --config=...`: see displacement_jax/train/main.py."""

import sys

from displacement_jax.train import main

sys.exit(main.main())
