"""`qarm rank train` as a job: `python jobs/rank_train.py [options]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank", "train", *sys.argv[1:]]))
