"""Elastic layers: modules whose active width / kernel size is a slice of shared supernet weights."""
from engine.elastic.activations import Activation, apply_activation, hard_sigmoid
from engine.elastic.backend import get_backend, implementation_for, set_backend, use_backend
from engine.elastic.batchnorm import ElasticBatchNorm2d
from engine.elastic.conv import ElasticConv2d
from engine.elastic.depthwise import ElasticDepthwiseConv2d
from engine.elastic.linear import ElasticLinear
from engine.elastic.se import ElasticSE, SqueezeExcite

__all__ = [
    "Activation", "apply_activation", "hard_sigmoid", "get_backend", "implementation_for", "set_backend", "use_backend",
    "ElasticBatchNorm2d", "ElasticConv2d", "ElasticDepthwiseConv2d", "ElasticLinear", "ElasticSE", "SqueezeExcite",
]
