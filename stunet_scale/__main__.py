"""`python -m stunet_scale ...` is the same as `stunet-scale ...`."""

import sys

from .cli import main

sys.exit(main())
