"""`python -m dli` is the `dli` command."""

import sys

from dli.cli import main

sys.exit(main())
