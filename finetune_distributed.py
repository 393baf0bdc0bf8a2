"""Fine-tune on several GPUs or nodes: finetune.py's loop, data-parallel under torchrun.

    torchrun --nproc-per-node 4 finetune_distributed.py [finetune.py's flags]
    ./finetune_distributed.sh [finetune.py's flags]          # one process per visible GPU

This file differs from finetune.py only in setup: one process per GPU (NCCL; gloo for CPU
processes), the model in DistributedDataParallel or, with --fsdp, sharded with FSDP2, and each
rank reading its share of the data. The loop is finetune.train itself: trained-token counts are
summed over ranks, so the gradients equal one process with the same global batch. Rank 0 alone
prints, logs and saves.
"""

import torch.distributed as torch_dist

from finetune import train
from qwen_ft.config import parse_config
from qwen_ft.dist import init_distributed
from qwen_ft.training import launch


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    dist = init_distributed(fsdp=cfg.fsdp)
    try:
        launch(train, cfg, dist, distributed=True)
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
