"""`qarm embed` as a job: `python jobs/embed.py [options] [--items-version N]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
