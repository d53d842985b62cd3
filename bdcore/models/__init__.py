"""Model registry: preactresnet18, resnet18, vgg19_bn, convnext_tiny, vit_b_16, mobilenet_v3_large,
efficientnet_b3 (adapted to small inputs as BackdoorBench does) and smallcnn for CPU tests."""
from bdcore.models.registry import (
    MODELS,
    WeightsError,
    build_model,
    check_weights_file,
    load_pretrained,
    model_names,
    read_state_dict,
    read_weight_shapes,
    register_model,
)

__all__ = ["MODELS", "WeightsError", "build_model", "check_weights_file", "load_pretrained", "model_names",
           "read_state_dict", "read_weight_shapes", "register_model"]
