"""QuantizerExplorer: one quantizer's staircase, its error and its straight-through gradient."""

from __future__ import annotations

import ipywidgets as W

from qviz import _checks
from qviz.engine import SCHEMES, QuantSpec, transfer_curve
from qviz.widgets import _charts
from qviz.widgets._base import Explorer

X_RANGE = (-1.5, 1.5)
POINTS = 601
STE_CHOICES = [("scheme's own", "default"), ("identity", "identity"), ("clipped", "clipped"),
               ("saturated", "saturated")]


def _bits_range(scheme: str, signed: bool) -> tuple[int, int]:
    lo, hi = SCHEMES[scheme].bits
    if _zero_centred(scheme) and signed:
        lo = 2
    return lo, min(hi, 8)


def _zero_centred(scheme: str) -> bool:
    """A uniform scheme with zero-point 0 (symmetric): its range is one magnitude and it may be unsigned."""
    return bool(getattr(SCHEMES[scheme], "symmetric", False))


class QuantizerExplorer(Explorer):
    """Pick a scheme, bits, range or α, signedness, narrow range and STE; see q(x) against the identity
    with its levels and thresholds, the error x - q(x), and the STE next to the true derivative (0
    almost everywhere). Stochastic schemes show one sample and the expected value.

    Papers: uniform schemes 004 §2 (eqs. 1-15), binary/ternary/DoReFa 003 Chapter 3, ceil 001 eqs. 3-5,
    relu/PACT 002 eq. 1 and §2.2.
    """

    title = "Quantizer explorer"

    def __init__(self, scheme: str = "affine", bits: int = 2, **kwargs):
        _checks.choice("scheme", scheme, SCHEMES)
        hi = _bits_range(scheme, True)[1]  # the slider stops at 8 bits: 256 steps already fill a projector
        self._initial = {"scheme": scheme, "bits": _checks.integer("bits", bits, SCHEMES[scheme].bits[0], hi)}
        super().__init__(**kwargs)

    def _controls(self):
        style = {"description_width": "70px"}
        self.scheme = W.Dropdown(options=[(f"{n} ({s.source})", n) for n, s in SCHEMES.items()],
                                 value=self._initial["scheme"], description="scheme", style=style)
        lo, hi = _bits_range(self._initial["scheme"], True)
        self.bits = W.IntSlider(value=min(max(self._initial["bits"], lo), hi), min=lo, max=hi, description="bits",
                                style=style, continuous_update=True)
        self.range = W.FloatRangeSlider(value=(-1.0, 1.0), min=X_RANGE[0], max=X_RANGE[1], step=0.05,
                                        description="range", style=style, continuous_update=True,
                                        readout_format=".3g")  # "-1 – 1" fits the 320-pixel column
        self.alpha = W.FloatSlider(value=1.0, min=0.1, max=3.0, step=0.05, description="alpha", style=style)
        self.signed = W.Checkbox(value=True, description="signed", indent=False)
        self.narrow = W.Checkbox(value=False, description="narrow range", indent=False)
        self.ste = W.Dropdown(options=STE_CHOICES, value="default", description="STE", style=style)
        self.scheme.observe(self._scheme_changed, names="value")
        self.signed.observe(self._scheme_changed, names="value")
        self._scheme_changed()
        return [self.scheme, self.bits, self.ste, self.range, self.alpha, W.HBox([self.signed, self.narrow])]

    def _scheme_changed(self, change=None) -> None:
        """Enable only the controls the scheme uses and keep bits inside its range."""
        scheme = SCHEMES[self.scheme.value]
        lo, hi = _bits_range(self.scheme.value, self.signed.value)
        with self.bits.hold_trait_notifications():
            self.bits.max = max(hi, self.bits.min)
            self.bits.min = lo
            self.bits.max = hi
            self.bits.value = min(max(self.bits.value, lo), hi)
        self.bits.disabled = lo == hi
        self.range.disabled = not scheme.takes_clip
        self.alpha.disabled = not scheme.takes_alpha
        self.signed.disabled = not _zero_centred(self.scheme.value)
        self.narrow.disabled = not scheme.takes_narrow
        if not scheme.takes_narrow:
            self.narrow.value = False

    def _params(self) -> dict:
        return {"scheme": self.scheme.value, "bits": self.bits.value, "range": tuple(self.range.value),
                "alpha": self.alpha.value, "signed": self.signed.value, "narrow": self.narrow.value,
                "ste": self.ste.value}

    @staticmethod
    def spec_for(params: dict) -> QuantSpec:
        """The QuantSpec the controls describe (the range becomes the scheme's clip)."""
        scheme = SCHEMES[params["scheme"]]
        lo, hi = params["range"]
        clip = None
        if scheme.takes_clip_pair:
            if _zero_centred(params["scheme"]):
                clip = max(abs(lo), abs(hi)) if params["signed"] else hi
            else:
                clip = (lo, hi)
        elif scheme.takes_clip:
            clip = hi
        if isinstance(clip, float) and clip <= 0:
            raise ValueError(f"range upper end {hi:g} must be > 0 for scheme {params['scheme']!r}")
        return QuantSpec(params["scheme"], bits=params["bits"], clip=clip,
                         alpha=params["alpha"] if scheme.takes_alpha else None, signed=params["signed"],
                         narrow=params["narrow"], ste=None if params["ste"] == "default" else params["ste"])

    def _compute(self, params, cancel, progress):
        spec = self.spec_for(params)
        yield {"spec": spec, "curve": transfer_curve(spec, *X_RANGE, POINTS)}

    def _figure(self, fig, result, params):
        spec, curve = result["spec"], result["curve"]
        n = len(set(curve["levels"].round(9).tolist()))
        title = f"{spec.scheme}, {spec.bits} bit{'s' if spec.bits > 1 else ''}: {n} levels"
        ste = spec.ste or SCHEMES[spec.scheme].default_ste
        return _charts.quantizer_figure(fig, curve, title, ste)

    def _summary(self, result, params) -> str:
        curve = result["curve"]
        levels = ", ".join(f"{v:.3g}" for v in curve["levels"][:8]) + (" ..." if len(curve["levels"]) > 8 else "")
        return f"levels: {levels}"
