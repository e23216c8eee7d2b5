import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# CI has two cores to itself; a developer running training beside the tests can set OMP_NUM_THREADS=1.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """(model folder, corpus file): a briefly pretrained tiny model and the toy text it learned."""
    from tiny_models import save_tiny_model_dir, write_toy_corpus

    root = tmp_path_factory.mktemp("train-assets")
    corpus = write_toy_corpus(root / "corpus.txt")
    return save_tiny_model_dir(root / "model", pretrain_on=corpus), corpus
