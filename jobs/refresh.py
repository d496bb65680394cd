"""`qarm refresh` as a job: `spark-submit jobs/refresh.py [options] [--refit]` (Ray Data at ray.address)."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
