"""python -m gateway.doctor: the same as the proxygate-doctor console script."""

import sys

from .cli import main

sys.exit(main())
