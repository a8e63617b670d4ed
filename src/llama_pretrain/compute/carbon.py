"""Carbon of compute by the Llama 2 paper's method (section 2.2.1, Table 2).

    tCO2eq = GPU-hours x power (kW) x PUE x grid carbon intensity (kgCO2eq/kWh) / 1000

Power is the GPU's power cap (TDP), not a measurement; interconnect, host servers and the
embodied carbon of hardware are left out, as in the paper. The defaults PUE 1.1 and
0.385 kgCO2eq/kWh reproduce every row of Table 2 (see ``TABLE2`` and ``display_hundredth``).
"""

from __future__ import annotations

import math
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

from ..errors import UserError

DEFAULT_PUE = 1.1
DEFAULT_INTENSITY = 0.385  # kgCO2eq per kWh

# Table 2 of the paper: (model, GPU-hours, power W, printed tCO2eq); total 3,311,616 h, 539.00 t.
TABLE2 = [
    ("7B", 184_320, 400, "31.22"),
    ("13B", 368_640, 400, "62.44"),
    ("34B", 1_038_336, 350, "153.90"),
    ("70B", 1_720_320, 400, "291.42"),
]
TABLE2_TOTAL = (3_311_616, "539.00")


def positive_number(name: str, value, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``); a UserError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise UserError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                        f"finite number, got {value!r}")
    return v


def energy_kwh(gpu_hours: float, power_w: float, pue: float = DEFAULT_PUE) -> float:
    """Facility energy: GPU-hours x power x PUE."""
    return (positive_number("GPU-hours", gpu_hours) * positive_number("power", power_w) / 1000.0
            * positive_number("PUE", pue))


def tco2eq(gpu_hours: float | None = None, power_w: float | None = None, pue: float = DEFAULT_PUE,
           intensity: float = DEFAULT_INTENSITY, kwh: float | None = None) -> float:
    """Tonnes of CO2eq, either from GPU-hours x power x PUE, or from measured ``kwh``.

    A measured ``kwh`` (IT energy, e.g. NVML or RAPL) is still multiplied by ``pue`` for the
    facility overhead; pass ``pue=1`` when the figure already includes it.
    """
    intensity = positive_number("carbon intensity", intensity, allow_zero=True)
    if kwh is not None:
        if gpu_hours is not None:
            raise UserError("give either kwh or gpu_hours (with power_w), not both")
        return positive_number("energy (kWh)", kwh, allow_zero=True) * positive_number("PUE", pue) * intensity / 1000.0
    if gpu_hours is None or power_w is None:
        raise UserError("tco2eq needs gpu_hours and power_w, or kwh")
    return energy_kwh(gpu_hours, power_w, pue) * intensity / 1000.0


def exact_tco2eq(gpu_hours, power_w, pue=DEFAULT_PUE, intensity=DEFAULT_INTENSITY) -> Decimal:
    """The same product in decimal arithmetic, so display rules see the exact value, not a float
    a hair below it (184320 x 0.4 x 1.1 x 0.385 / 1000 is exactly 31.223808)."""
    d = [Decimal(str(x)) for x in (gpu_hours, power_w, pue, intensity)]
    return d[0] * d[1] / 1000 * d[2] * d[3] / 1000


def truncate_hundredth(value) -> str:
    """Cut (not round) to two decimals: how Table 2 prints each row (62.4476 -> 62.44)."""
    return str(Decimal(str(value)).quantize(Decimal("0.01"), rounding=ROUND_DOWN))


def round_hundredth(value) -> str:
    """Round half up to two decimals: how Table 2 prints the total (538.999 -> 539.00)."""
    return str(Decimal(str(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def table2(pue: float = DEFAULT_PUE, intensity: float = DEFAULT_INTENSITY) -> dict:
    """Table 2 recomputed: rows with exact and paper-style displayed tCO2eq, and the total."""
    rows, total = [], Decimal(0)
    for model, hours, power, printed in TABLE2:
        exact = exact_tco2eq(hours, power, pue, intensity)
        total += exact
        rows.append({"model": model, "gpu_hours": hours, "power_w": power,
                     "tco2eq": float(exact), "display": truncate_hundredth(exact), "paper": printed})
    return {"rows": rows,
            "total": {"gpu_hours": sum(r["gpu_hours"] for r in rows), "tco2eq": float(total),
                      "display": round_hundredth(total), "paper": TABLE2_TOTAL[1]},
            "pue": pue, "intensity": intensity}
