"""KernelReadout: live memory and latency of a layer in the bit-packed Cython kernels."""

from __future__ import annotations

import math

import ipywidgets as W
import torch

from qviz import packed
from qviz.engine import weight_layers
from qviz.widgets import _charts
from qviz.widgets._base import Explorer

KINDS = [("binary XOR-popcount (W1 x A1)", "binary"), ("hybrid AND-popcount (W1 x A{0,1})", "hybrid"),
         ("bit-serial low-bit (Wb x Ab)", "lowbit"), ("codebook W x float A", "lut")]
KIND_BITS = {"binary": [1], "hybrid": [1], "lowbit": [1, 2, 4], "lut": [1, 2, 4, 8]}
KERNELS = [("1x1 (linear)", (1, 1)), ("3x3", (3, 3)), ("4x4", (4, 4)), ("5x5", (5, 5)), ("7x7", (7, 7))]


def kernel_of(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """A layer's kernel as (kh, kw) for the memory report: (1, 1) for a linear layer, (1, k) for Conv1d,
    (kh, kw) for Conv2d and (kd * kh, kw) for Conv3d; only the product kh kw counts for memory and K."""
    k = tuple(int(v) for v in weight_shape[2:])
    if not k:
        return (1, 1)
    if len(k) == 1:
        return (1, k[0])
    return (math.prod(k[:-1]), k[-1])


def runs_disagree(latency: dict) -> bool:
    """Whether the middle half of the timed runs leaves the verdict open: qviz faster in some and slower in
    others, or the ratio spread over more than 1.5x (a scheduler stall or a busy neighbour hit some calls;
    on a shared 2-core machine one such reading said 99x faster and another 12x slower for one shape)."""
    low, high = latency["ratio_low"], latency["ratio_high"]
    return (low < 1 < high) or high > 1.5 * low


class KernelReadout(Explorer):
    """A layer shape (typed, or picked from a model) and bits -> bytes of the packed weights against
    float32 (with the ratio of 003 eq. 2-17 beside the achieved one) and the latency of the qviz kernel
    against torch float32 on the same shape and threads, measured within a small time budget.
    """

    title = "Kernel readout"

    def __init__(self, model: torch.nn.Module | None = None, **kwargs):
        self._model_layers = weight_layers(model) if model is not None else []
        super().__init__(**kwargs)

    def set_model(self, model: torch.nn.Module) -> None:
        """Offer the layers of `model` as shapes (the dashboard shares its model)."""
        self._model_layers = weight_layers(model)
        self.source.options = self._sources()
        self.refresh()

    def _sources(self):
        return [("typed shape", "")] + [(f"{x.name} {tuple(x.weight.shape)}", x.name) for x in self._model_layers]

    def _controls(self):
        style = {"description_width": "90px"}
        self.source = W.Dropdown(options=self._sources(), value="", description="layer", style=style)
        self.out_features = W.BoundedIntText(value=4096, min=1, max=65536, description="out features", style=style)
        self.in_features = W.BoundedIntText(value=4096, min=1, max=65536, description="in features", style=style)
        self.kernel = W.Dropdown(options=KERNELS, value=(1, 1), description="kernel", style=style)
        self.batch = W.BoundedIntText(value=1, min=1, max=4096, description="batch (M)", style=style)
        self.kind = W.Dropdown(options=KINDS, value="lut", description="kernel kind", style=style)
        self.bits = W.Dropdown(options=KIND_BITS["lut"], value=4, description="bits", style=style)
        self.per_channel = W.Checkbox(value=False, description="codebook per channel", indent=False)
        self.budget = W.FloatSlider(value=0.25, min=0.05, max=2.0, step=0.05, description="budget (s)", style=style)
        self.kind.observe(self._kind_changed, names="value")
        self.source.observe(self._source_changed, names="value")
        return [self.source, self.out_features, self.in_features, self.kernel, self.batch, self.kind, self.bits,
                self.budget, self.per_channel]

    def _kind_changed(self, change=None) -> None:
        options = KIND_BITS[self.kind.value]
        value = self.bits.value if self.bits.value in options else options[min(1, len(options) - 1)]
        self.bits.options = options
        self.bits.value = value

    def _source_changed(self, change=None) -> None:
        layer = next((x for x in self._model_layers if x.name == self.source.value), None)
        typed = layer is None
        for control in (self.out_features, self.in_features, self.kernel):
            control.disabled = not typed
        if layer is not None:
            kernel = kernel_of(tuple(layer.weight.shape))
            if kernel not in [v for _, v in self.kernel.options]:  # e.g. a 7x3 or 11x11 kernel: show it as it is
                self.kernel.options = [*KERNELS, (f"{kernel[0]}x{kernel[1]} (this layer)", kernel)]
            # rows per output channel: a transposed convolution or GPT-2's Conv1D hold outputs along axis 1
            out, per_output = layer.rows().shape
            self.out_features.value = out
            self.in_features.value = per_output // (kernel[0] * kernel[1])
            self.kernel.value = kernel

    def _params(self) -> dict:
        return {"out": self.out_features.value, "in": self.in_features.value, "kernel": self.kernel.value,
                "m": self.batch.value, "kind": self.kind.value, "bits": self.bits.value,
                "per_channel": self.per_channel.value, "budget": self.budget.value}

    def _compute(self, params, cancel, progress):
        kh, kw = params["kernel"]
        memory = packed.memory_report(params["out"], params["in"], kernel=(kh, kw), bits=params["bits"],
                                      codebook_bits=32, per_channel=params["per_channel"])
        yield {"memory": memory, "latency": None}
        if cancel.is_set():
            return
        progress(0.5, f"timing within {params['budget']:.2f} s")
        try:
            latency = packed.measure_latency(params["kind"], params["m"], params["in"] * kh * kw, params["out"],
                                             bits=params["bits"], budget_s=params["budget"])
        except ValueError as err:  # a shape too large to time here: the memory readout still stands
            yield {"memory": memory, "latency": None, "not_timed": str(err)}
            return
        yield {"memory": memory, "latency": latency}

    def _figure(self, fig, result, params):
        mem = result["memory"]
        bars = {"float32": mem["float32_bytes"], f"packed ({params['bits']}-bit rows)": mem["packed_bytes"],
                "codebook": mem["codebook_bytes"]}
        title_mem = f"memory: {mem['ratio']:.2f}x smaller (eq. 2-17: {mem['ratio_formula']:.2f}x)"
        lat = result["latency"]
        # the same bars at zero until measured: the chart keeps its structure
        torch_ms, qviz_ms = (0.0, 0.0) if lat is None else (lat["torch_s"] * 1e3, lat["qviz_s"] * 1e3)
        timing = {"torch float32": torch_ms, f"qviz {params['kind']}": qviz_ms}
        if result.get("not_timed"):
            title_lat = "latency: not timed (see below)"
        elif lat is None:
            title_lat = f"latency: timing within {params['budget']:.2f} s"
        else:
            faster = f"{lat['ratio']:.2f}x faster" if lat["ratio"] >= 1 else f"{1 / lat['ratio']:.2f}x slower"
            unsure = "runs disagree: " if runs_disagree(lat) else ""
            title_lat = f"latency: {unsure}qviz {faster} ({lat['path']}, {lat['threads']} threads)"
        return _charts.kernel_bars(fig, bars, timing, title_mem, title_lat)

    def _summary(self, result, params) -> str:
        mem, lat = result["memory"], result["latency"]
        text = (f"packed {mem['packed_bytes']:,} B + codebook {mem['codebook_bytes']:,} B vs float32 "
                f"{mem['float32_bytes']:,} B")
        if lat is not None:
            text += (f"; qviz {lat['qviz_s'] * 1e3:.3f} ms vs torch {lat['torch_s'] * 1e3:.3f} ms (medians of "
                     f"{lat['runs']} runs; in the middle half of them qviz ran at {lat['ratio_low']:.2f}x to "
                     f"{lat['ratio_high']:.2f}x torch's speed)")
            if runs_disagree(lat):
                text += (". The runs disagree, so the ratio above is not a measurement to quote: the machine is "
                         "busy or the budget too short for this shape; time again or raise the budget")
        elif result.get("not_timed"):
            text += f"; latency not timed: {result['not_timed']}"
        return text
