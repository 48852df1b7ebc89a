from .numerics import (
    dequantize_weight_int8,
    fake_quantize_activation,
    fake_quantize_weight,
    int8_linear_reference,
    quantize_activation_int8,
    quantize_weight_int8,
)


__all__ = [
    "dequantize_weight_int8",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "int8_linear_reference",
    "quantize_activation_int8",
    "quantize_weight_int8",
]
