import torch.distributed as dist

from src.cli import main

try:
    main()
finally:
    # a multi-process (DDP) job: release the process group before the interpreter exits, or gloo's threads may still
    # run at shutdown ("terminate called without an active exception", exit code -6)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
