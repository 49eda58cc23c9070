"""`python -m harmodt` is `python -m harmodt.train`."""

import sys

from .train import main

sys.exit(main())
