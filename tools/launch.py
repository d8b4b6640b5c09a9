"""Upstream-compatible launcher entry: hand everything to torch.distributed.run (torchrun).

    python tools/launch.py --nnodes N --node_rank R --master_addr A --master_port P --nproc_per_node G SCRIPT [ARGS]

SCRIPT is executed as is (``--no-python``), e.g. a config under configs/; torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every copy and manages the processes.
"""
import sys

from torch.distributed.run import main as torchrun_main

if __name__ == "__main__":
    torchrun_main(["--no-python"] + sys.argv[1:])
