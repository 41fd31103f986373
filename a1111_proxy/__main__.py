"""`python -m a1111_proxy ...`, the same as `a1111-proxy ...`."""

from __future__ import annotations

import sys

from a1111_proxy.cli import main

sys.exit(main())
