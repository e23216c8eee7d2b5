"""`python -m dca ...` (and `torchrun ... -m dca train ...`): the same command line as `dca`."""

import sys

from dca.cli import main

sys.exit(main())
