"""`python -m fastdiff COMMAND ...`, and under torchrun `torchrun --nproc-per-node=K -m
fastdiff distill ...`: the `fastdiff` command (`fastdiff.apps.cli`; an apps-layer module)."""

import sys

from fastdiff.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
