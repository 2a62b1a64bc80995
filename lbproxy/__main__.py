"""``python -m lbproxy``: the same as the ``lbproxy`` command."""

import sys

from .run.cli import main

sys.exit(main())
