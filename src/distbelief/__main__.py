"""``python -m distbelief`` is the ``distbelief`` command."""

import sys

from distbelief.launch.console import main

sys.exit(main())
