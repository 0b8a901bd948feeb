"""The ``privacy`` subcommand: epsilon for a noise multiplier, or the reverse.

Examples::

  fedjax-sim privacy --noise-multiplier 1.1 --sampling poisson --rate 0.01 \\
      --rounds 1000 --delta 1e-5
  fedjax-sim privacy --target-epsilon 2 --sampling fixed --cohort-size 100 \\
      --population 10000 --rounds 1000 --delta 1e-5 --json
  fedjax-sim privacy --mechanism dp_ftrl_tree --noise-multiplier 10 --rounds 1000 \\
      --delta 1e-5 [--max-rounds 1024] [--participation once|once_per_tree]
  fedjax-sim privacy --mechanism dp_ftrl_tree --noise-multiplier 2 --rounds 300 \\
      --delta 1e-6 --cohort-size 100 --population 10000 [--max-rounds 50]
  fedjax-sim privacy --mechanism ddg --noise-multiplier 1 --sampling poisson --rate 0.01 \\
      --population 10000 --rounds 1000 --delta 1e-5 --bits 16 --clip-norm 1 --dim 7850 \\
      [--dropout 0.1] [--beta 0.6]

With ``--cohort-size M --population N`` the DP-FTRL epsilon is that of a
``fedjax-sim run --aggregator dp_ftrl --sampling cyclic`` run (the same
:class:`~fedjax_sim.privacy.accounting.DPFTRLAccountant`): the tree restarts every
``--max-rounds`` rounds (default one pass, ``N // M`` rounds, the most it may be), and
the participation follows from the cyclic order (at most once in total within one pass,
then at most once per tree).

With ``--mechanism ddg|skellam`` the rounds are distributed DP under secure aggregation
(:mod:`fedjax_sim.privacy.distributed`): each of the ``m = rate * population`` expected
clients adds a noise share of std ``z * clip_norm / sqrt(m)`` to its update encoded in a
``--bits``-bit ring (``--dim`` parameters padded to a power of two; the scale fits 4
standard deviations of a noisy sum of ``ceil(m)`` clients), and every round is accounted
with the ``floor((1 - dropout) m)`` shares expected to reach the sum.

Prints one line (or one JSON object with ``--json``) to stdout and returns 0; a bad
configuration prints one ``fedjax-sim privacy: error: ...`` line to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from fedjax_sim._validation import ConfigError, fail
from fedjax_sim.experiment.flags import add_field_flags
from fedjax_sim.experiment.schema import option, section_fields
from fedjax_sim.privacy import accounting as acc
from fedjax_sim.privacy import distributed as dist
from fedjax_sim.privacy import dp_ftrl_accounting as ftrl
from fedjax_sim.privacy.schedule import SamplingSpec
from fedjax_sim.secagg.encoding import padded_size

MECHANISMS = ("sampled_gaussian", "dp_ftrl_tree", "ddg", "skellam")
DISTRIBUTED = ("ddg", "skellam")


@dataclasses.dataclass(frozen=True)
class PrivacyQuery:
    """The ``privacy`` subcommand's own fields (the others are the run's, shared)."""

    mechanism: str = option("sampled_gaussian", "sampled Gaussian rounds, DP-FTRL tree "
                            "aggregation, or distributed DP under secure aggregation "
                            "(distributed discrete Gaussian, Skellam)", choices=MECHANISMS)
    participation: str | None = option(None, "dp_ftrl_tree without a cyclic schedule: each "
                                       "client in at most one round overall (once, the "
                                       "default) or once per tree",
                                       choices=ftrl.DP_FTRL_PARTICIPATION)
    dim: int | None = option(None, "ddg/skellam (required with them): the model's number of "
                             "parameters, padded to a power of two", low=1)


# The run's fields this subcommand shares (flat key -> extra flags of earlier versions).
SHARED = {"noise_multiplier": (), "target_epsilon": (), "sampling": (),
          "sampling_rate": ("--rate",), "cohort_size": (), "num_clients": ("--population",),
          "rounds": (), "delta": (), "accountant": (), "ftrl_restart_rounds": ("--max-rounds",),
          "clip_norm": (), "bits": (), "dropout": (), "beta": (), "k_stddevs": ()}
DISTRIBUTED_ONLY = ("clip_norm", "bits", "dim", "dropout", "beta", "k_stddevs")
OWN = section_fields(PrivacyQuery, "privacy")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``privacy`` subcommand to an argparse ``subparsers`` object.

    The parsed namespace carries ``func=run``.
    """
    from fedjax_sim.experiment.config import FIELDS

    p = subparsers.add_parser(
        "privacy", help="client-level DP epsilon for a noise multiplier (or the reverse)",
        description="Client-level (epsilon, delta) of DP federated rounds via dp-accounting. "
                    "Poisson sampling: add/remove-one-client adjacency; fixed-size: "
                    "replace-one-client; dp_ftrl_tree: replace-one-client-with-zero; ddg/skellam: "
                    "add/remove-one-client, Poisson sampling only.")
    goal = p.add_mutually_exclusive_group()  # prints epsilon, or calibrates z
    add_field_flags(goal, [FIELDS["noise_multiplier"], FIELDS["target_epsilon"]])
    add_field_flags(p, [FIELDS[k] for k in SHARED if k not in ("noise_multiplier",
                                                                "target_epsilon")],
                    flags=SHARED)
    add_field_flags(p, OWN)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run)
    return p


@dataclasses.dataclass(frozen=True)
class _Args:
    """The parsed values, each validated by its field (None: not given)."""

    noise_multiplier: float | None
    target_epsilon: float | None
    sampling: str | None
    rate: float | None
    cohort_size: int | None
    population: int | None
    rounds: int | None
    delta: float | None
    accountant: str
    max_rounds: int | None
    mechanism: str
    participation: str | None
    clip_norm: float | None
    bits: int | None
    dim: int | None
    dropout: float | None
    beta: float | None
    k_stddevs: float | None


def _parse(ns: argparse.Namespace) -> _Args:
    from fedjax_sim.experiment.config import FIELDS

    def value(key):
        raw = getattr(ns, key)
        spec = next((s for s in OWN if s.key == key), None) or FIELDS[key]
        return None if raw is None else spec.coerce(raw)

    z, eps = value("noise_multiplier"), value("target_epsilon")
    if (z is None) == (eps is None):
        fail("--noise-multiplier", z, "give exactly one of --noise-multiplier (prints "
             "epsilon) and --target-epsilon (prints the noise multiplier)")
    for flag, key in (("--rounds", "rounds"), ("--delta", "delta")):
        if getattr(ns, key) is None:
            fail(flag, None, "is required")
    return _Args(z, eps, value("sampling"), value("sampling_rate"), value("cohort_size"),
                 value("num_clients"), value("rounds"), value("delta"),
                 value("accountant") or "rdp", value("ftrl_restart_rounds"),
                 value("mechanism") or "sampled_gaussian", value("participation"),
                 *(value(k) for k in DISTRIBUTED_ONLY))


def _sampling(args) -> acc.SamplingSpec:
    if args.sampling is None or args.sampling == "cyclic":
        fail("--sampling", args.sampling, "--mechanism sampled_gaussian needs --sampling "
             "poisson or fixed")
    if args.sampling == "poisson":
        if args.cohort_size is not None:
            fail("--cohort-size", args.cohort_size, "only for --sampling fixed")
        if args.rate is None:
            fail("--rate", None, "--sampling poisson needs --rate Q in (0, 1]")
        return SamplingSpec.poisson(args.rate, population_size=args.population)
    if args.rate is not None:
        fail("--rate", args.rate, "only for --sampling poisson")
    if args.cohort_size is None or args.population is None:
        fail("--cohort-size" if args.cohort_size is None else "--population", None,
             "--sampling fixed needs --cohort-size M and --population N")
    return SamplingSpec.fixed(args.cohort_size, args.population)


def _compute(args) -> dict[str, Any]:
    out: dict[str, Any] = {"mechanism": args.mechanism, "rounds": args.rounds,
                           "delta": args.delta}
    if args.mechanism in DISTRIBUTED:
        return _compute_distributed(args, out)
    for key in DISTRIBUTED_ONLY:
        if getattr(args, key) is not None:
            fail("--" + key.replace("_", "-"), getattr(args, key),
                 "only for --mechanism ddg or skellam")
    if args.mechanism == "dp_ftrl_tree":
        return _compute_dp_ftrl(args, out)
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


def _compute_dp_ftrl(args, out: dict[str, Any]) -> dict[str, Any]:
    """DP-FTRL tree aggregation: explicit participation, or that of a cyclic schedule."""
    for flag, val in (("--sampling", args.sampling), ("--rate", args.rate)):
        if val is not None:
            fail(flag, val, "not used by --mechanism dp_ftrl_tree (no sampling)")
    if args.accountant != "rdp":
        fail("--accountant", args.accountant, "dp_ftrl_tree is accounted with rdp")
    max_rounds, participation = args.max_rounds, args.participation or "once"
    cyclic = args.cohort_size is not None or args.population is not None
    if cyclic:
        if args.cohort_size is None or args.population is None:
            fail("--cohort-size" if args.cohort_size is None else "--population", None,
                 "a cyclic schedule needs both --cohort-size M and --population N")
        if args.participation is not None:
            fail("--participation", args.participation,
                 "follows from the cyclic schedule (--cohort-size, --population)")
        per_pass = ftrl.cyclic_rounds_per_pass(args.population, args.cohort_size)
        max_rounds = per_pass if max_rounds is None else max_rounds
        if max_rounds > per_pass:
            fail("--max-rounds", max_rounds,
                 f"exceeds one pass of the cyclic schedule (N // M = {per_pass} rounds): a "
                 "client could contribute twice to one tree")
        participation = ftrl.dp_ftrl_participation(args.rounds, per_pass)
        out.update(sampling=f"cyclic(m={args.cohort_size}, n={args.population})",
                   rounds_per_pass=per_pass)
    out.update(accountant="rdp", participation=participation, max_rounds=max_rounds,
               neighboring_relation="replace_special")
    if args.target_epsilon is not None:
        z = ftrl.calibrate_dp_ftrl_noise_multiplier(
            args.target_epsilon, args.delta, args.rounds, max_rounds=max_rounds,
            participation=participation)
        out.update(target_epsilon=args.target_epsilon, noise_multiplier=z)
    else:
        z = args.noise_multiplier
        out.update(noise_multiplier=z)
    out["epsilon"] = ftrl.dp_ftrl_epsilon(z, args.rounds, args.delta, max_rounds=max_rounds,
                                         participation=participation)
    return out


def _compute_distributed(args, out: dict[str, Any]) -> dict[str, Any]:
    """DDG / Skellam under secure aggregation: Poisson sampling, m = rate * population;
    ``--bits``, ``--dropout``, ``--k-stddevs`` default to the run's defaults."""
    from fedjax_sim.experiment.config import FIELDS

    for flag, val in (("--max-rounds", args.max_rounds),
                      ("--participation", args.participation)):
        if val is not None:
            fail(flag, val, "only for --mechanism dp_ftrl_tree")
    if args.sampling != "poisson":
        fail("--sampling", args.sampling, f"--mechanism {args.mechanism} needs --sampling "
             "poisson (with --rate and --population)")
    sampling = _sampling(args)
    if args.population is None:
        fail("--population", None, f"--mechanism {args.mechanism} needs --population N (the "
             "expected clients per round are rate * N)")
    for flag, val in (("--clip-norm", args.clip_norm), ("--dim", args.dim)):
        if val is None:
            fail(flag, None, f"is required with --mechanism {args.mechanism}")
    if args.accountant != "rdp":
        fail("--accountant", args.accountant, f"{args.mechanism} is accounted with rdp")
    n = args.rate * args.population
    if n < 1:
        fail("--rate", args.rate, f"expects {n:g} clients per round of the population; "
             "distributed noise needs at least 1")
    run = {k: FIELDS[k].default for k in ("bits", "dropout", "k_stddevs")}  # the run's
    bits, dropout, k_stddevs = (run[k] if getattr(args, k) is None else getattr(args, k)
                                for k in ("bits", "dropout", "k_stddevs"))
    beta = dist.DEFAULT_BETA if args.beta is None else args.beta
    padded = padded_size(args.dim)
    survivors = dist.expected_survivors(n, dropout)
    settings = dict(clip_norm=args.clip_norm, bits=bits, dim=padded, expected_clients=n,
                    k_stddevs=k_stddevs)
    if args.target_epsilon is not None:
        z = dist.calibrate_distributed(args.target_epsilon, args.delta, args.rounds,
                                       args.mechanism, sampling=sampling, beta=beta,
                                       dropout=dropout, **settings)
        out.update(target_epsilon=args.target_epsilon)
    else:
        z = args.noise_multiplier
    noise = dist.DistributedNoise(args.mechanism, z, beta=beta, **settings)
    ledger = noise.ledger(sampling, delta=args.delta)
    ledger.record_round(args.rounds, survivors=survivors)
    out.update(sampling=sampling.describe(), accountant="rdp",
               neighboring_relation="add_or_remove_one", noise_multiplier=z,
               epsilon=ledger.epsilon(), bits=bits, clip_norm=args.clip_norm,
               dim=args.dim, padded_dim=padded, expected_clients=n, survivors=survivors,
               dropout=dropout, beta=beta, k_stddevs=k_stddevs, scale=noise.scale,
               local_std=noise.local_std,
               l2_sensitivity=noise.l2_sensitivity)
    return out


def _format(out: dict[str, Any]) -> str:
    if out["mechanism"] in DISTRIBUTED:
        what = (f"{dist.MECHANISM[out['mechanism']]} ({out['bits']}-bit ring, dim "
                f"{out['dim']} padded to {out['padded_dim']}, {out['expected_clients']:g} "
                f"expected clients, {out['survivors']} counted at dropout "
                f"{out['dropout']:g}, beta={out['beta']:.3g}), {out['sampling']}")
    elif out["mechanism"] == "dp_ftrl_tree":
        tree = ("one tree" if out["max_rounds"] is None
                else f"tree restarted every {out['max_rounds']} rounds")
        what = f"dp_ftrl_tree ({tree}, participation {out['participation']}"
        what += f", {out['sampling']})" if "sampling" in out else ")"
    else:
        what = out["sampling"]
    where = (f"rounds={out['rounds']}, delta={out['delta']:g}, {what}, "
             f"{out['accountant']} accountant, {out['neighboring_relation']} client "
             "adjacency")
    if "target_epsilon" in out:
        return (f"noise_multiplier = {out['noise_multiplier']:.6g} (epsilon = "
                f"{out['epsilon']:.6g} <= target {out['target_epsilon']:g}; {where})")
    return (f"epsilon = {out['epsilon']:.6g} (noise_multiplier = "
            f"{out['noise_multiplier']:g}; {where})")


def run(ns: argparse.Namespace) -> int:
    """Runs the ``privacy`` subcommand; returns the process exit code (0 ok, 2 bad config)."""
    try:
        args = _parse(ns)
        out = _compute(args)
    except ConfigError as e:
        print(f"fedjax-sim privacy: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(_format(out))
    return 0


__all__ = ["add_parser", "run"]
