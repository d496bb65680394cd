"""`ray job submit ... -- python jobs/embed.py [--config F] [--set k=v] [--root DIR] [--run-id ID]`.

A thin entry point: the same code path as `qarm embed`.
"""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
