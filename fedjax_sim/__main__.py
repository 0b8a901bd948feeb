"""``python -m fedjax_sim``: the ``fedjax-sim`` command line."""

import sys

from fedjax_sim.experiment.cli import main

sys.exit(main())
