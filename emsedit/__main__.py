"""``python -m emsedit``: see :mod:`emsedit.cli`."""

import sys

from emsedit.cli import main

sys.exit(main())
