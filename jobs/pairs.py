"""`qarm pairs` as a job: `spark-submit jobs/pairs.py [options]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
