"""`python -m rnnkern.gradflow ...`: the same as `python -m rnnkern gradflow ...`."""

import sys

from rnnkern.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["gradflow"] + sys.argv[1:]))
