"""How long quantize_model and calibrate take on a ResNet-18-shaped network (Hugging Face's ResNet built from a
config: 64-128-256-512 channels, two basic blocks per stage, 11.2M parameters) for 32 images of 64x64, with
the float forward pass on the same images as the yardstick, all interleaved in one run on 2 threads.

Run: .venv/bin/python benchmarks/quantize.py   (needs transformers: pip install transformers)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians, table

from qviz.engine import calibrate, quantize_model, quantized_layers, sqnr_db


def resnet18_shaped() -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                          layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config).eval()


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model = resnet18_shaped()
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {"pixel_values": images}
    params = sum(p.numel() for p in model.parameters())
    qm = quantize_model(model, 8, 8)

    def float_forward():
        with torch.no_grad():
            return model(**batch).logits

    candidates = {
        "float forward (32 images)": float_forward,
        "quantize_model(model, 8, 8)": lambda: quantize_model(model, 8, 8),
        "calibrate, moving_average": lambda: calibrate(qm, [batch], method="moving_average"),
        "calibrate, minmax": lambda: calibrate(qm, [batch], method="minmax"),
        "calibrate, percentile": lambda: calibrate(qm, [batch], method="percentile"),
        "calibrate, mse": lambda: calibrate(qm, [batch], method="mse"),
    }
    medians = interleaved_medians(candidates, rounds=7, warmup=1)
    base = medians["float forward (32 images)"]
    rows = [[name, f"{t * 1e3:.0f}", f"{t / base:.2f}"] for name, t in medians.items()]
    print(f"torch {torch.__version__}, 2 threads; ResNet-18-shaped network, {params / 1e6:.1f}M parameters, "
          f"{len(quantized_layers(qm))} quantized layers; medians of 7 interleaved rounds\n")
    print(table(rows, ["step", "ms", "x float forward"]))
    calibrate(qm, [batch])
    with torch.no_grad():
        sqnr = sqnr_db(float_forward(), qm(**batch).logits)
    print(f"\nW8A8 output SQNR against float on these images: {sqnr:.1f} dB")


if __name__ == "__main__":
    main()
