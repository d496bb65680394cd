"""`qarm world` as a job: `python jobs/world.py [options] [--emit-embeddings]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["world", *sys.argv[1:]]))
