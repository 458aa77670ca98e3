"""Tutorial: reproduce the paper's claims and read the results.

``mirrorsym reproduce`` (the command line) and ``mirrorsym.report.run_reproduction`` (the same thing from
Python) run the experiments of the reproduction suite, store each one's results with the config that made
them (an interrupted run resumes), and write ``report.html``, ``report.md``, ``claims.json`` and the
figures. Every claim is a prediction of the theory next to a measurement, and can fail. This script

1. runs a set of experiments (``--only NAME ...``; default: all) at the ``quick`` size (``tiny`` with
   ``--tiny``, the size the test suite uses);
2. reads ``claims.json`` back and prints each claim with its prediction and measurement;
3. draws a summary figure (claims passed per experiment, seconds per experiment) next to the
   experiments' own figures.

Run: ``python examples/reproduce_paper.py [--tiny] [--only theorem1 noise] [--out DIR]``.
The command-line equivalent is ``mirrorsym reproduce theorem1 noise --quick --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mirrorsym.experiments import registry  # noqa: E402
from mirrorsym.report import run_reproduction  # noqa: E402

pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 70)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/reproduce_paper"), help="folder for the figures")
    parser.add_argument("--only", nargs="*", default=None,
                        help="experiment names (default: all; with --tiny: theorem1)")
    parser.add_argument("--report", type=Path, default=None, help="report folder (default: OUT/report)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.report or args.out / "report"
    names = args.only or (["theorem1"] if args.tiny else None)
    size = "tiny" if args.tiny else "quick"
    print("experiments:", ", ".join(f"{name} ({exp.TITLE})" for name, exp in registry().items()
                                     if names is None or name in names))

    code = run_reproduction(names, size=size, out=report, device="cpu")

    claims = pd.DataFrame(json.loads((report / "claims.json").read_text()))
    print(claims[["experiment", "claim", "predicted", "measured", "passed"]].to_string(index=False))
    print(f"\n{int(claims['passed'].sum())}/{len(claims)} claims passed; report: {report / 'report.html'}")

    # Figures: a summary, plus a copy of each experiment's own figures --------------------------------------
    per_exp = claims.groupby("experiment", sort=False).agg(passed=("passed", "sum"), total=("passed", "size"),
                                                           seconds=("seconds", "first"))
    fig, ax = plt.subplots(1, 2, figsize=(11, 0.5 * len(per_exp) + 2))
    ax[0].barh(per_exp.index, per_exp["total"], color="tab:red", label="failed")
    ax[0].barh(per_exp.index, per_exp["passed"], color="tab:green", label="passed")
    ax[0].set_xlabel("claims")
    ax[0].set_title(f"Claims ({size} size)")
    ax[0].invert_yaxis()
    ax[0].legend(fontsize=8)
    ax[1].barh(per_exp.index, per_exp["seconds"], color="tab:blue")
    ax[1].set_xlabel("seconds (this machine; cached runs show their first time)")
    ax[1].set_title("Time per experiment")
    ax[1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(args.out / "claims_summary.png", dpi=110)
    plt.close(fig)
    for png in sorted(report.glob("*/*.png")):
        shutil.copy(png, args.out / png.name)
    print(f"figures written to {args.out}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
