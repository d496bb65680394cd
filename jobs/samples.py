"""`qarm samples` as a job: `spark-submit jobs/samples.py [options]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["samples", *sys.argv[1:]]))
