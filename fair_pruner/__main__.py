"""``python -m fair_pruner ...`` (and ``torchrun ... -m fair_pruner prune-lm ...``): the CLI."""
import sys

from .cli import main

sys.exit(main())
