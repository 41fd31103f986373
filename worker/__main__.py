"""`python -m worker`, the same as `a1111-proxy worker`."""

from __future__ import annotations

import sys

from a1111_proxy.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
