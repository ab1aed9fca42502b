"""Write a seeded, untrained init of the default policy's weights (reproducible).

Usage: python models/default/init_weights.py [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from policy import WEIGHTS, CnnMlp  # noqa: E402

log = logging.getLogger("init_weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    module = CnnMlp()
    path = os.path.join(HERE, WEIGHTS)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    logging.basicConfig(level=logging.INFO)
    log.info("wrote %s (%d parameters)", path, sum(p.numel() for p in module.parameters()))


if __name__ == "__main__":
    main()
