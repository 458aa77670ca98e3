"""Tutorial: reproduce the paper's claims and read the results.

``mirrorsym reproduce`` (the command line) and ``mirrorsym.report.run_reproduction`` (the same thing from
Python) run the experiments of the reproduction suite, store each one's results with the config that made
them (an interrupted run resumes), and write ``report.html``, ``report.md``, ``claims.json`` and the
figures. Every claim is a prediction of the theory next to a measurement, and can fail. This script

1. runs a set of experiments (``--only NAME ...``; default: all) at the ``quick`` size (``tiny`` with
   ``--tiny``, the size the test suite uses);
2. reads ``claims.json`` back and prints each claim with its prediction, measurement and outcome: a
   *check* (an identity) passes or fails, a *finding* (an empirical statement of the paper) is reproduced,
   not reproduced or contradicted;
3. draws a summary figure (outcomes and seconds per experiment) next to the experiments' own figures.

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
    # A check (an identity: closed form, invariance, exact threshold) passes or fails; a finding (an empirical
    # statement of the paper) is "reproduced", "not reproduced" or "contradicted" by a rule fixed in advance.
    claims["outcome"] = [
        ("passed" if c["passed"] else "failed") if c.get("kind", "check") == "check" else c["verdict"]
        for c in claims.to_dict("records")
    ]
    shown = [c for c in ("experiment", "kind", "claim", "predicted", "measured", "outcome") if c in claims]
    short = claims[shown].astype(str).apply(lambda col: col.str.slice(0, 60 if col.name == "claim" else 28))
    print(short.to_string(index=False))
    print("\n" + ", ".join(f"{n} {o}" for o, n in claims["outcome"].value_counts().items())
          + f"; exit code {code}; report: {report / 'report.html'}")

    # Figures: a summary, plus a copy of each experiment's own figures --------------------------------------
    colors = {"passed": "tab:green", "failed": "tab:red", "reproduced": "tab:olive",
              "not reproduced": "tab:gray", "contradicted": "tab:purple"}
    table = claims.groupby(["experiment", "outcome"], sort=False).size().unstack(fill_value=0)
    table = table.reindex(columns=[c for c in colors if c in table.columns])
    seconds = claims.groupby("experiment", sort=False)["seconds"].first().reindex(table.index)
    fig, ax = plt.subplots(1, 2, figsize=(11, 0.5 * len(table) + 2))
    left = pd.Series(0, index=table.index)
    for outcome in table.columns:
        ax[0].barh(table.index, table[outcome], left=left, color=colors[outcome], label=outcome)
        left = left + table[outcome]
    ax[0].set_xlabel("claims")
    ax[0].set_title(f"Claims ({size} size): checks pass or fail, findings get a verdict")
    ax[0].invert_yaxis()
    ax[0].legend(fontsize=8)
    ax[1].barh(seconds.index, seconds.to_numpy(), color="tab:blue")
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
