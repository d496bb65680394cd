"""`qarm ingest movielens` as a job: `python jobs/ingest_movielens.py [options] --path DIR`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", "movielens", *sys.argv[1:]]))
