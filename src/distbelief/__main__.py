"""``python -m distbelief`` is the ``distbelief`` command."""

import sys

from distbelief.launch.cli import main

sys.exit(main())
