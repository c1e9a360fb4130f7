"""agu: Adapt-then-Unlearn for pre-trained GANs (Tiwary et al., TMLR 2025)."""

from .checkpoint import load_gan, save_gan
from .data import ImageSet, load_digits
from .errors import AguError, CheckpointError, ConfigError, DataError, FeedbackError, TrainingError
from .models import GAN, build_gan, register_architecture

__version__ = "0.1.0"

__all__ = [
    "GAN",
    "AguError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FeedbackError",
    "ImageSet",
    "TrainingError",
    "build_gan",
    "load_digits",
    "load_gan",
    "register_architecture",
    "save_gan",
]
