"""`qarm align train` as a job: `python jobs/align_train.py [options]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", "train", *sys.argv[1:]]))
