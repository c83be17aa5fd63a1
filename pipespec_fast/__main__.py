"""``python -m pipespec_fast`` (and ``torchrun ... -m pipespec_fast``): the command line."""

import sys

from pipespec_fast.cli import main

sys.exit(main())
