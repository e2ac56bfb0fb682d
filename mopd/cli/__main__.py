"""`python -m mopd.cli ...`, the same as the `mopd` command."""

import sys

from mopd.cli import main

sys.exit(main())
