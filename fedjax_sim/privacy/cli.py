"""The ``privacy`` subcommand: epsilon for a noise multiplier, or the reverse.

Examples::

  fedjax-sim privacy --noise-multiplier 1.1 --sampling poisson --rate 0.01 \\
      --rounds 1000 --delta 1e-5
  fedjax-sim privacy --target-epsilon 2 --sampling fixed --cohort-size 100 \\
      --population 10000 --rounds 1000 --delta 1e-5 --json
  fedjax-sim privacy --mechanism dp_ftrl_tree --noise-multiplier 10 --rounds 1000 \\
      --delta 1e-5 [--max-rounds 1024] [--participation once|once_per_tree]

Prints one line (or one JSON object with ``--json``) to stdout and returns 0; a bad
configuration prints one ``fedjax-sim privacy: error: ...`` line to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedjax_sim._validation import ConfigError, check_float, fail
from fedjax_sim.privacy import accounting as acc

MECHANISMS = ("sampled_gaussian", "dp_ftrl_tree")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``privacy`` subcommand to an argparse ``subparsers`` object.

    The parsed namespace carries ``func=run``.
    """
    p = subparsers.add_parser(
        "privacy", help="client-level DP epsilon for a noise multiplier (or the reverse)",
        description="Client-level (epsilon, delta) of DP federated rounds via dp-accounting. "
                    "Poisson sampling: add/remove-one-client adjacency; fixed-size: "
                    "replace-one-client; dp_ftrl_tree: replace-one-client-with-zero.")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--noise-multiplier", type=float, metavar="Z",
                      help="noise std / clip norm; prints epsilon")
    goal.add_argument("--target-epsilon", type=float, metavar="E",
                      help="prints the smallest noise multiplier reaching this epsilon")
    p.add_argument("--mechanism", choices=MECHANISMS, default="sampled_gaussian",
                   help="sampled Gaussian rounds (default) or DP-FTRL tree aggregation")
    p.add_argument("--sampling", choices=acc.SAMPLING_KINDS, default=None,
                   help="cohort sampling (required for sampled_gaussian)")
    p.add_argument("--rate", type=float, metavar="Q", help="Poisson inclusion probability")
    p.add_argument("--cohort-size", type=int, metavar="M", help="fixed cohort size")
    p.add_argument("--population", type=int, metavar="N", help="population size")
    p.add_argument("--rounds", type=int, required=True, metavar="T")
    p.add_argument("--delta", type=float, required=True, metavar="D")
    p.add_argument("--accountant", choices=acc.ACCOUNTANTS, default="rdp")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="dp_ftrl_tree: tree size (restarts every this many rounds)")
    p.add_argument("--participation", choices=acc.DP_FTRL_PARTICIPATION, default="once",
                   help="dp_ftrl_tree: each client in at most one round overall / per tree")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run)
    return p


def _sampling(args) -> acc.SamplingSpec:
    if args.sampling is None:
        fail("--sampling", None, "required for --mechanism sampled_gaussian (poisson|fixed)")
    if args.sampling == "poisson":
        if args.cohort_size is not None:
            fail("--cohort-size", args.cohort_size, "only for --sampling fixed")
        if args.rate is None:
            fail("--rate", None, "--sampling poisson needs --rate Q in (0, 1]")
        return acc.SamplingSpec.poisson(args.rate, population_size=args.population)
    if args.rate is not None:
        fail("--rate", args.rate, "only for --sampling poisson")
    if args.cohort_size is None or args.population is None:
        fail("--cohort-size" if args.cohort_size is None else "--population", None,
             "--sampling fixed needs --cohort-size M and --population N")
    return acc.SamplingSpec.fixed(args.cohort_size, args.population)


def _compute(args) -> dict[str, Any]:
    out: dict[str, Any] = {"mechanism": args.mechanism, "rounds": args.rounds,
                           "delta": args.delta}
    if args.mechanism == "dp_ftrl_tree":
        for flag, val in (("--sampling", args.sampling), ("--rate", args.rate),
                          ("--cohort-size", args.cohort_size)):
            if val is not None:
                fail(flag, val, "not used by --mechanism dp_ftrl_tree (no sampling)")
        if args.accountant != "rdp":
            fail("--accountant", args.accountant, "dp_ftrl_tree is accounted with rdp")

        def eps(z: float) -> float:
            return acc.dp_ftrl_epsilon(z, args.rounds, args.delta, max_rounds=args.max_rounds,
                                       participation=args.participation)

        out.update(accountant="rdp", participation=args.participation,
                   max_rounds=args.max_rounds, neighboring_relation="replace_special")
        if args.target_epsilon is not None:
            z = _calibrate_tree(eps, args.target_epsilon)
            out.update(target_epsilon=args.target_epsilon, noise_multiplier=z, epsilon=eps(z))
        else:
            out.update(noise_multiplier=args.noise_multiplier,
                       epsilon=eps(args.noise_multiplier))
        return out
    if args.max_rounds is not None:
        fail("--max-rounds", args.max_rounds, "only for --mechanism dp_ftrl_tree")
    sampling = _sampling(args)
    out.update(sampling=sampling.describe(), accountant=args.accountant,
               neighboring_relation=sampling.neighboring_relation.name.lower())
    if args.target_epsilon is not None:
        z = acc.calibrate_noise_multiplier(args.target_epsilon, args.delta, args.rounds,
                                           sampling, accountant=args.accountant)
        out.update(target_epsilon=args.target_epsilon, noise_multiplier=z)
    else:
        z = args.noise_multiplier
        out.update(noise_multiplier=z)
    out["epsilon"] = acc.epsilon_for(args.rounds, acc.PrivacyConfig(z, sampling,
                                                                    args.accountant),
                                     args.delta)
    return out


def _calibrate_tree(eps, target: float) -> float:
    """Tree RDP is alpha * depth / (2 z^2): bisection on z (monotone)."""
    target = check_float("--target-epsilon", target, min_value=0.0, min_exclusive=True)
    lo, hi = 1e-3, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 2.0 ** 24:
            fail("--target-epsilon", target, "unreachable for these settings")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
        if hi - lo < 1e-6:
            break
    return hi


def _format(out: dict[str, Any]) -> str:
    where = (f"rounds={out['rounds']}, delta={out['delta']:g}, "
             f"{out.get('sampling', out['mechanism'])}, {out['accountant']} accountant, "
             f"{out['neighboring_relation']} client adjacency")
    if "target_epsilon" in out:
        return (f"noise_multiplier = {out['noise_multiplier']:.6g} (epsilon = "
                f"{out['epsilon']:.6g} <= target {out['target_epsilon']:g}; {where})")
    return (f"epsilon = {out['epsilon']:.6g} (noise_multiplier = "
            f"{out['noise_multiplier']:g}; {where})")


def run(args: argparse.Namespace) -> int:
    """Runs the ``privacy`` subcommand; returns the process exit code (0 ok, 2 bad config)."""
    try:
        out = _compute(args)
    except ConfigError as e:
        print(f"fedjax-sim privacy: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(_format(out))
    return 0


__all__ = ["add_parser", "run"]
