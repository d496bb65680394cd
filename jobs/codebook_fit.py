"""`qarm codebook fit` as a job: `spark-submit jobs/codebook_fit.py [options] [--levels L --k K ...]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["codebook", "fit", *sys.argv[1:]]))
