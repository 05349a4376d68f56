"""Run the seeded cluster simulation: `python -m cmdlog.simulation --help`."""

import sys

from cmdlog.simulation.runner import main

sys.exit(main())
