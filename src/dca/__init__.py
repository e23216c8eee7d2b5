"""dca: Differentiable Cache Augmentation for frozen Hugging Face causal LMs."""

from dca.config import CoprocessorConfig
from dca.model import AugmentedLM, AugmentOutput, TrainingLoss

__all__ = ["AugmentOutput", "AugmentedLM", "CoprocessorConfig", "TrainingLoss"]
__version__ = "0.1.0"
