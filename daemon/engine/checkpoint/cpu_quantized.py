"""Quantized layers on MLX's CPU backend: dequantize, then one BLAS matmul.

MLX's CPU `quantized_matmul` has no BLAS path: measured here for (256 x 3072) @ (3072 x 3072) in fp32, it
takes 2,394 ms at 8 bits and 3,454 ms at 4 bits, against 74 ms for the dense product and 192 / 218 ms for
dequantize + dense. So on the CPU a quantized model keeps its weights quantized in memory (the point of
quantizing) and widens one layer at a time to multiply; on a GPU the layers stay MLX's own.
"""

from __future__ import annotations

from mlx import nn

from daemon.engine.runtime import mx


class DequantizingLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same isinstance) computing through a dense BLAS product."""

    def __call__(self, x: mx.array) -> mx.array:
        w = mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits, mode=self.mode
        )
        if "bias" in self:
            return mx.addmm(self["bias"], x, w.T)
        return x @ w.T


def use_dequantizing_layers(root: nn.Module) -> int:
    """On the CPU backend, make every QuantizedLinear of `root` compute through BLAS; returns how many.

    The class is swapped in place: the layer keeps its parameters and its place in the tree, so LoRA
    wrappers, saving and status see the same quantized layer.
    """
    if mx.default_device() != mx.cpu:
        return 0
    n = 0
    for _, module in root.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = DequantizingLinear
            n += 1
    return n
