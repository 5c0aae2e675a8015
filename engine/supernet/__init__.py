"""The OFA-MobileNetV3 supernet, its search space and subnet export."""
from engine.supernet.arch import SupernetSpec
from engine.supernet.mobilenetv3 import OFAMobileNetV3, ofa_mobilenetv3

__all__ = ["SupernetSpec", "OFAMobileNetV3", "ofa_mobilenetv3"]
