"""``python -m apart_fast`` is the ``apart-fast`` console script."""

import sys

from apart_fast.cli import main

sys.exit(main())
