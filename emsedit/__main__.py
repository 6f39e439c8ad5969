"""``python -m emsedit``: see :mod:`emsedit.cli` (and :mod:`emsedit.warm` for ``EMSEDIT_WARM=1``)."""

import sys

from emsedit import warm

argv = sys.argv[1:]
if warm.enabled(argv):
    status = warm.run_remote(argv)
    if status is not None:
        sys.exit(status)

from emsedit.cli import main  # noqa: E402

status = main(argv)
warm.flush_and_exit(status)  # skip the interpreter's teardown of torch (~1 s)
