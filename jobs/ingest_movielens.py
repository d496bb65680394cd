"""`python jobs/ingest_movielens.py --path DIR [--root ROOT] [--run-id ID]`: the same as `qarm ingest movielens`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", "movielens", *sys.argv[1:]]))
