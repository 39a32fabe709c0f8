"""python -m fastenc.benchmark [bench options]: the same as `fastenc bench`."""

import sys

from .cli import bench_main

sys.exit(bench_main())
