"""``python -m isobranch`` is the ``isobranch`` command."""

import sys

from .cli import main

sys.exit(main())
