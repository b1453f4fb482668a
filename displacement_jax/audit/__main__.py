"""`python -m displacement_jax.audit --config=...`: see displacement_jax/audit/main.py."""

import sys

from displacement_jax.audit import main

sys.exit(main.main())
