"""`llama-pretrain carbon`: tCO2eq = GPU-hours x power x PUE x grid intensity (Llama 2, Table 2)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "carbon", help="carbon of GPU time by the paper's method; --table2 reproduces Table 2",
        description="tCO2eq = GPU-hours x power (kW) x PUE x carbon intensity (kgCO2eq/kWh) / 1000, "
                    "the method of section 2.2.1: power is the GPU power cap (TDP), not measured; "
                    "interconnect, host servers and hardware manufacture are not counted. With "
                    "PUE 1.1 and 0.385 kgCO2eq/kWh every row of Table 2 is reproduced. Table 2 "
                    "prints rows cut (not rounded) to the hundredth and the total rounded; "
                    "--table2 shows both the exact value and that display.")
    p.add_argument("--table2", action="store_true", help="recompute Table 2 of the paper row by row")
    p.add_argument("--gpu-hours", type=float, help="GPU-hours of the run")
    p.add_argument("--power-w", type=float, default=400.0,
                   help="power per GPU in watts (default 400, the A100 SXM cap used by RSC)")
    p.add_argument("--gpu", help="take --power-w from the GPU table's TDP (a100-80gb, h100, ...)")
    p.add_argument("--pue", type=float, default=None, help="power usage effectiveness (default 1.1)")
    p.add_argument("--intensity", type=float, default=None,
                   help="grid carbon intensity in kgCO2eq/kWh (default 0.385)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compute.carbon import DEFAULT_INTENSITY, DEFAULT_PUE, energy_kwh, positive_number, table2, tco2eq
    from ..errors import UserError

    pue = DEFAULT_PUE if args.pue is None else positive_number("--pue", args.pue)
    intensity = DEFAULT_INTENSITY if args.intensity is None else positive_number(
        "--intensity", args.intensity, allow_zero=True)
    if args.table2:
        if args.gpu_hours is not None:
            raise UserError("--table2 takes no --gpu-hours")
        tab = table2(pue, intensity)
        if args.json:
            print(json.dumps(tab, indent=2))
            return 0
        print(f"Table 2 recomputed: tCO2eq = GPU-hours x power x PUE {pue:g} x {intensity:g} kgCO2eq/kWh")
        print(f"{'model':<6} {'GPU-hours':>10} {'power W':>8} {'exact t':>12} {'shown':>8} {'paper':>8}")
        for r in tab["rows"]:
            print(f"{r['model']:<6} {r['gpu_hours']:>10,} {r['power_w']:>8} {r['tco2eq']:>12.4f} "
                  f"{r['display']:>8} {r['paper']:>8}")
        tot = tab["total"]
        print(f"{'total':<6} {tot['gpu_hours']:>10,} {'':>8} {tot['tco2eq']:>12.4f} "
              f"{tot['display']:>8} {tot['paper']:>8}")
        print("rows are cut to the hundredth and the total rounded, as the paper prints them")
        return 0
    if args.gpu_hours is None:
        raise UserError("give --gpu-hours (and --power-w or --gpu), or --table2")
    hours = positive_number("--gpu-hours", args.gpu_hours)
    power = args.power_w
    if args.gpu:
        from ..compute.gpus import get_gpu
        power = get_gpu(args.gpu).tdp_w
    power = positive_number("--power-w", power)
    t = tco2eq(hours, power, pue, intensity)
    row = {"model": args.gpu or "run", "gpu_hours": hours, "power_w": power, "tco2eq": t}
    out = {"rows": [row], "total": {"gpu_hours": hours, "tco2eq": t},
           "energy_kwh": energy_kwh(hours, power, pue), "pue": pue, "intensity": intensity}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{hours:,.0f} GPU-hours x {power:g} W x PUE {pue:g} = {out['energy_kwh']:,.1f} kWh; "
              f"x {intensity:g} kgCO2eq/kWh = {t:,.4f} tCO2eq")
    return 0
