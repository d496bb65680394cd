"""`qarm codebook assign` as a job: `spark-submit jobs/codebook_assign.py [options] [--version V]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["codebook", "assign", *sys.argv[1:]]))
