import sys

from qdlm_jax.cli import main

sys.exit(main())
