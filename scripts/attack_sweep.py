#!/usr/bin/env python
"""Defence sweep of the privacy attack lab: a table (CSV + JSON) and plots (PNG).

Every attack of ``fedjax_sim.attacks`` on scikit-learn digits against per-client clipping,
Gaussian noise, larger client batches, more local steps and secure aggregation (see
``fedjax_sim.attacks.sweep``). The defaults finish in a few minutes on 2 CPU cores.

Usage::

  python scripts/attack_sweep.py --output results/attacks [--small] [--seed 0]

Writes ``sweep.csv``, ``sweep.json``, ``sweep.png`` (PSNR / exact recovery per setting)
and ``grid.png`` (originals above reconstructions, per setting) into ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
if SCRIPTS not in sys.path:  # _cpu_setup, also when a test loads this file by its path
    sys.path.insert(0, SCRIPTS)

from _cpu_setup import add_compile_cache_flag, compile_cache  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory for the table and plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-victims", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="Inverting Gradients steps")
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a reduced grid (smoke test)")
    add_compile_cache_flag(parser)
    args = parser.parse_args(argv)
    compile_cache(args)  # before the first compile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import fedjax_sim as fs

    sweep = fs.attacks.sweep

    start = time.perf_counter()
    try:
        rows, images = sweep.defence_sweep(
            seed=args.seed, num_victims=args.num_victims, steps=args.steps,
            restarts=args.restarts, small=args.small,
            progress=lambda s: print(f"[{time.perf_counter() - start:6.1f} s] {s}",
                                     file=sys.stderr))
    except fs.ConfigError as e:
        print(f"attack_sweep: error: {e}", file=sys.stderr)
        return 2
    paths = sweep.write_table(rows, args.output)
    fig = sweep.plot_sweep(rows)
    paths["png"] = os.path.join(args.output, "sweep.png")
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    paths["grid"] = fs.attacks.plots.save_reconstruction_grid(
        os.path.join(args.output, "grid.png"),
        [(label, o, r) for label, (o, r) in images.items()], max_columns=6,
        title="originals (top) vs reconstructions (bottom)")
    print(json.dumps({"rows": len(rows), "seconds": round(time.perf_counter() - start, 1),
                      **paths}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
