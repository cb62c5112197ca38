"""``python -m bench``: the benchmark suite of ufaas; the logic is in :mod:`bench.run`."""

import sys

from .run import main

sys.exit(main())
