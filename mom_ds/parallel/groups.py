"""Process groups for expert parallelism, from DeepSpeed (deepspeed.utils.groups).

With world size W and expert-parallel size E, DeepSpeed's layout is: expert-parallel groups
of E consecutive ranks ([0, 1], [2, 3], ... for E = 2), which exchange tokens by all-to-all,
and expert-data-parallel groups of the W / E ranks holding the same modules ([0, 2, ...],
[1, 3, ...]), which reduce those modules' gradients. Dense parameters reduce over all W.
"""
from __future__ import annotations

import torch.distributed as dist


def expert_parallel_groups(ep_size: int):
    """(expert-parallel group, expert-data-parallel group) of this rank, created once."""
    import deepspeed
    from deepspeed.utils import groups

    if not dist.is_initialized():
        deepspeed.init_distributed()
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
