"""`python -m minillama ...` (and `torchrun -m minillama train ...`): the same as the `minillama` command."""

import sys

from .cli.main import main

sys.exit(main())
