"""MAE-ST video ViTs: the pretraining model, the classifier, official-checkpoint interop and compute counts."""

from models.checkpoints import checkpoint_layout, load_pretrained, to_container
from models.classifier import VideoClassifier, build_classifier
from models.config import MODEL_SIZES, ClassifierConfig, MAEConfig, VideoViTConfig
from models.flops import classifier_macs, pretrain_macs, training_flops
from models.hub import from_pretrained, save_pretrained
from models.mae import MaskedAutoencoder, build_pretrain_model

__all__ = [
    "MODEL_SIZES", "ClassifierConfig", "MAEConfig", "MaskedAutoencoder", "VideoClassifier", "VideoViTConfig",
    "build_classifier", "build_pretrain_model", "classifier_macs", "from_pretrained", "load_pretrained",
    "pretrain_macs", "save_pretrained", "to_container", "checkpoint_layout", "training_flops",
]
