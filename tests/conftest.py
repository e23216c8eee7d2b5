import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# CI has two cores to itself; a developer running training beside the tests can set OMP_NUM_THREADS=1.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
