"""`qarm align embed` as a job: `python jobs/align_embed.py [options] [--model V]`."""

import sys

from qarm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", "embed", *sys.argv[1:]]))
