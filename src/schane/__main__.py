"""``python -m schane`` (and ``torchrun -m schane``) runs the CLI."""

import sys

from schane.cli import main

sys.exit(main())
