"""``python -m samsvae ...`` (also what ``torchrun -m samsvae train ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
