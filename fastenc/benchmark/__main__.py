"""python -m fastenc.benchmark [bench options]: the same as `fastenc bench`."""

import sys

from .cli import main

sys.exit(main())
