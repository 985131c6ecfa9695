"""mergeline: continual model merging as a service."""

import os
import sys

# torch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is
# set before torch allocates anything (it is read once). A fold allocates its tensors fresh, and
# glibc hands large blocks back to the OS (engine._bound_allocator), so every tensor page-faults
# again: with huge pages a ViT-B/32 OPCM fold took 0.89x the time, at the same peak RSS and the
# same bytes (bench/results/fold_vit_b32.json, engine_no_thp). Every mergeline process (API,
# workers, CLI) imports this package before torch. Not under a fold memory budget, whose bound
# (bench/out_of_core.py) was measured with 4 KiB pages; THP_MEM_ALLOC_ENABLE=0 turns it off anyway.
if "torch" not in sys.modules and not os.environ.get("MERGELINE_FOLD_MEMORY_BYTES"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
