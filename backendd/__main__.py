"""`python -m backendd` is the `backendd` command."""

import sys

from .cli import main

sys.exit(main())
