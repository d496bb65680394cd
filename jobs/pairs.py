"""`spark-submit jobs/pairs.py [--config F] [--set k=v] [--root DIR] [--run-id ID]`: the same as `qarm pairs`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
