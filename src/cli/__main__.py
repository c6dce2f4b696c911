"""``python -m hpi.cli``: the same as the ``hpi`` command."""

import sys

from hpi.cli.app import main

sys.exit(main())
