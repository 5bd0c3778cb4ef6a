"""`python -m fastdpo ...`: the `fastdpo` command, also as `torchrun -m fastdpo train ...`."""

import sys

from fastdpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
