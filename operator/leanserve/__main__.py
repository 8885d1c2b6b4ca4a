"""``python -m leanserve`` runs the CLI."""

import sys

from leanserve.cli import main

sys.exit(main())
