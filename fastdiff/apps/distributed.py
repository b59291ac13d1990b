"""`torchrun ... -m fastdiff.apps.distributed [--timeout-s S] COMMAND ...`: an alias of the
`fastdiff` command run as the ranks of a data-parallel job (`torchrun ... -m fastdiff
COMMAND ...` does the same; see `fastdiff.apps.torchrun`). COMMAND is `distill` or
`train-teacher` with the flags of the `fastdiff` CLI. Exit codes: 0 done, 2 a usage error,
130 interrupted, 1 a failed collective (another rank died or timed out).
"""

from __future__ import annotations

import sys

from fastdiff.apps.cli import main as cli_main


def main(argv=None) -> int:
    """Run `fastdiff ARGV` as a rank of a torchrun job (also with WORLD_SIZE=1)."""
    return cli_main(argv, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
