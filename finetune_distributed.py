"""Fine-tune on several GPUs or nodes: finetune.py's loop, data-parallel under torchrun.

    torchrun --nproc-per-node 4 finetune_distributed.py [finetune.py's flags]
    ./finetune_distributed.sh [finetune.py's flags]          # one process per visible GPU

This file differs from finetune.py only in setup: one process per GPU (NCCL; gloo for CPU
processes), the model in DistributedDataParallel or, with --fsdp, sharded with FSDP2, and each
rank reading its share of the data. The loop is finetune.train itself: trained-token counts are
summed over ranks, so the gradients equal one process with the same global batch. Rank 0 alone
prints, logs and saves.
"""

import sys

import torch.distributed as torch_dist

from finetune import train
from qwen_ft.config import ConfigError, parse_config
from qwen_ft.data import BadSample, DataError
from qwen_ft.dist import init_distributed
from qwen_ft.model import ModelUnavailable
from qwen_ft.stop import PeerDied, RunStopped


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    dist = init_distributed(fsdp=cfg.fsdp)
    try:
        train(cfg, dist)
    except (DataError, ModelUnavailable, ConfigError, RunStopped) as e:
        # Every rank meets the same bad input and the same stop; one message is enough. A sample
        # that fails to load while training fails on one rank only, and a peer's death is seen by
        # every rank left (rank 0 may be the one that died): each says so.
        if dist.is_main or isinstance(e, (BadSample, PeerDied)):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # a second signal, or one before training began: one line, no traceback
        if dist.is_main:
            print(f"\n{e or 'interrupted'}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 130))
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
