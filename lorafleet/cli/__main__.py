"""`python -m lorafleet.cli ...` is the `lorafleet` command."""

import sys

from lorafleet.cli import main

sys.exit(main())
