"""``python -m lazarus ...`` is the ``lazarus`` command."""

import sys

from lazarus.cli import main

sys.exit(main())
