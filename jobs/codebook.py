"""`spark-submit jobs/codebook.py fit|assign|diff|quality [options]`: the same as `qarm codebook ...`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["codebook", *sys.argv[1:]]))
