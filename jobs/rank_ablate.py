"""`qarm rank ablate` as a job: `python jobs/rank_ablate.py [options]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank", "ablate", *sys.argv[1:]]))
