"""Run by tests/test_distributed.py under `lazarus.launch -n 2`: the `lazarus` command line itself.

usage: distributed_cli.py OUT_DIR lazarus-arguments...
Runs ``lazarus.cli.main(lazarus-arguments)`` and writes OUT_DIR/cli_rank{R}.json with its exit
code and a digest of this rank's trainable weights at every checkpoint (taken as each is saved).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import lazarus  # noqa: F401
import mlx.core as mx
import numpy as np

from lazarus import cli
from lazarus.loop import Loop


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    rank = mx.distributed.init().rank()
    digests = {}
    save = Loop.save_checkpoint

    def save_checkpoint(self, path):  # every rank calls it, rank 0 writes
        w = {k: np.array(v) for k, v in self.trainable_weights().items()}
        digests[Path(path).stem] = hashlib.sha256(b"".join(w[k].tobytes() for k in sorted(w))).hexdigest()
        return save(self, path)

    Loop.save_checkpoint = save_checkpoint
    rc = cli.main(argv)
    with open(os.path.join(out, f"cli_rank{rank}.json"), "w") as f:
        json.dump({"rc": rc, "digests": digests}, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
