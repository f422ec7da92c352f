"""`deepdosimetrics federated server|site|local`: federated pre-training of the autoencoder on Flower.

``server`` runs the aggregating side (a SuperLink and the rounds), ``site`` one hospital's SuperNode (its
cohort never leaves), ``local`` a whole federation of real processes on this machine (trials, tests).
"""

from __future__ import annotations

import argparse
from typing import Any

from DeepDosimetricsLib.commands import add_common_arguments, describe_command
from DeepDosimetricsLib.runtime.devices import DEVICES
from DeepDosimetricsLib.runtime.errors import InputError

HELP = "federated pre-training across hospitals (Flower): server, site (one per hospital), local (trials)"


def _federation_options(parser: argparse.ArgumentParser) -> None:
    """The federation and the training recipe (server and local): defaults from FederatedConfig and the
    training defaults (Resources/train-default.yaml, then --config)."""
    from DeepDosimetricsLib.commands.train import training_defaults
    from DeepDosimetricsLib.deep.federated.config import STRATEGIES, FederatedConfig

    fed = FederatedConfig()
    defaults = training_defaults()
    parser.add_argument("--out", required=True, metavar="MODEL_DIR",
                        help="model folder: model.json/model.pt (the final global weights), rounds.csv, MODEL_CARD.md, "
                        "federated-checkpoint.pt (one per round), logs/")
    parser.add_argument("--resume", action="store_true",
                        help="continue from MODEL_DIR/federated-checkpoint.pt (a new federation when there is none)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N", help=f"rounds (default {fed.rounds})")
    parser.add_argument("--local-steps", type=int, default=None, metavar="N",
                        help=f"training steps per site and round (default {fed.local_steps})")
    parser.add_argument("--strategy", default=None, metavar="NAME",
                        help=f"{' | '.join(STRATEGIES)} (default {fed.strategy}; fedavg is weighted by tiles seen)")
    parser.add_argument("--mu", type=float, default=None, dest="fedprox_mu",
                        help=f"FedProx proximal weight (default {fed.fedprox_mu})")
    parser.add_argument("--min-sites", type=int, default=None, metavar="N",
                        help=f"sites needed to start and to aggregate a round (default {fed.min_sites})")
    parser.add_argument("--sites", type=int, default=None, metavar="N",
                        help="sites expected: the first round waits (up to --round-timeout) for N to connect "
                        "(default: --min-sites; local: the number of --site)")
    parser.add_argument("--round-timeout", type=float, default=None, metavar="S",
                        help="seconds a round waits for every site; then it aggregates the replies at hand, waiting up to "
                        f"twice as long while fewer than --min-sites replied (default {fed.round_timeout:g})")
    parser.add_argument("--round-retries", type=int, default=None, metavar="N",
                        help=f"repeats of a round with fewer than --min-sites replies before stopping (default {fed.round_retries})")
    parser.add_argument("--dp-noise", type=float, default=None, metavar="Z",
                        help="differential privacy (Flower's client-side fixed clipping, preview): Gaussian noise "
                        f"multiplier (default {fed.dp_noise:g}: off)")
    parser.add_argument("--dp-clipping", type=float, default=None, metavar="C",
                        help=f"differential privacy: clipping norm of each site's update (default {fed.dp_clipping:g})")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML training recipe every site trains with (see Resources/train-default.yaml)")
    parser.add_argument("--channels", default=None, help="default | full | list such as window:lung,mask:PTV,dose")
    parser.add_argument("--tile", type=int, default=None, metavar="N", help=f"tile edge (default {defaults.get('tile')})")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help=f"tiles per step (default {defaults.get('batch')})")
    parser.add_argument("--features", type=int, default=None, metavar="K",
                        help=f"learned features per tile (default {defaults.get('features')})")
    parser.add_argument("--widths", type=int, nargs="+", default=None, metavar="W", help="encoder widths per level")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {defaults.get('lr')})")
    parser.add_argument("--seed", type=int, default=None, help=f"random seed (default {defaults.get('seed', 0)})")
    parser.add_argument("--pca-start", action=argparse.BooleanOptionalAction, default=None,
                        help="start at PCA fitted in round 0 from the sites' sums (default: the recipe's pca_start, "
                        f"{defaults.get('pca_start')})")


def _tls_options(parser: argparse.ArgumentParser, server: bool) -> None:
    if server:
        parser.add_argument("--ssl-ca-certfile", metavar="PEM", help="TLS: the certificate authority (CA)")
        parser.add_argument("--ssl-certfile", metavar="PEM", help="TLS: the server's certificate (signed by the CA)")
        parser.add_argument("--ssl-keyfile", metavar="PEM", help="TLS: the server's private key")
        parser.add_argument("--site-public-key", action="append", default=[], metavar="FILE",
                            help="node authentication (needs TLS): an authorised site's public key (OpenSSH EC); "
                            "repeat per site; only these sites may join")
    else:
        parser.add_argument("--root-certificates", metavar="PEM",
                            help="TLS: the CA certificate the server's certificate is signed by")
        parser.add_argument("--insecure", action="store_true",
                            help="no TLS (trials on one machine only); without it --root-certificates is needed")
        parser.add_argument("--auth-private-key", metavar="FILE",
                            help="node authentication (needs TLS): this site's private key (OpenSSH EC, e.g. "
                            "ssh-keygen -t ecdsa -b 384); the server lists its .pub")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """server | site | local, each with its options."""
    from DeepDosimetricsLib.deep.federated.launch import DEFAULT_SERVER_ADDRESS, DEFAULT_SITE_RUNTIME_PORT

    describe_command(parser, ok="the federation finished (server, local) or the site was stopped (site)",
                     notes="Run `deepdosimetrics federated server --help` (or site, local) for each side's options.")
    roles = parser.add_subparsers(dest="role", metavar="ROLE")
    server = roles.add_parser("server", help="the aggregating side: a Flower SuperLink and the rounds",
                              description="The aggregating side: starts a Flower SuperLink at --address and runs "
                              "the rounds; sites connect with `federated site --server ADDRESS`.")
    describe_command(server, ok="every round finished and MODEL_DIR holds the model",
                     notes="Only weights, counts and scalar metrics reach the server. A round checkpoint is written "
                     "after each round; --resume continues from it.")
    _federation_options(server)
    server.add_argument("--address", default=DEFAULT_SERVER_ADDRESS, metavar="HOST:PORT",
                        help="where the SuperLink listens for sites (default %(default)s; 0.0.0.0:PORT for all interfaces)")
    _tls_options(server, server=True)
    add_common_arguments(server, quiet=False)

    site = roles.add_parser("site", help="one hospital: trains on its cohort when the server asks",
                            description="One hospital's node: connects to the server and trains on its own cohort "
                            "and cache each round; images, tiles and patient ids never leave.")
    describe_command(site, ok="the site was stopped (Ctrl-C, SIGTERM) or its node ended")
    add_common_arguments(site, cohort=True, cache=True, quiet=False)
    site.add_argument("--name", default="site", help="this site's name: in its logs, and sent in round 0 so the server can name it (default %(default)s)")
    site.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    site.add_argument("--runtime-port", type=int, default=DEFAULT_SITE_RUNTIME_PORT, metavar="PORT",
                      help="local port of the node's runtime API (127.0.0.1; default %(default)s)")
    site.add_argument("--device", choices=DEVICES, default="auto", help="training device (default %(default)s)")
    site.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads of the site's training")
    site.add_argument("--audit", metavar="DIR", default=None,
                      help="record every message this site sends (description .json + the exact bytes .bin)")
    _tls_options(site, server=False)

    local = roles.add_parser("local", help="a whole federation of real processes on this machine",
                             description="A SuperLink, one site process per --site and the rounds, on this machine "
                             "(trials and tests; no TLS: localhost only).")
    describe_command(local, ok="every round finished and MODEL_DIR holds the model")
    _federation_options(local)
    local.add_argument("--site", action="append", required=True, metavar="NAME=DIR", dest="site_cohorts",
                       help="a site and its cohort folder (repeat)")
    local.add_argument("--cache-root", metavar="DIR", default=None,
                       help="caches of the sites in DIR/NAME (default: each cohort's default cache)")
    local.add_argument("--audit", metavar="DIR", default=None, help="record what each site sends in DIR/NAME")
    local.add_argument("--device", choices=DEVICES, default="auto", help="training device of the sites")
    local.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads per site (default: cores / sites)")
    add_common_arguments(local, quiet=False)


def _run_settings(args: argparse.Namespace):
    """RunSettings from the options: FederatedConfig defaults <- options; the training recipe from
    make_config (the output-bias start needs one site's data: off; the PCA start is fitted in round 0)."""
    from pathlib import Path

    from DeepDosimetricsLib.deep.federated.config import FederatedConfig, RunSettings
    from DeepDosimetricsLib.deep.train.training import make_config

    names = ("rounds", "local_steps", "strategy", "fedprox_mu", "min_sites", "round_timeout", "round_retries",
             "dp_noise", "dp_clipping", "seed")
    fed = FederatedConfig.from_dict({n: getattr(args, n) for n in names if getattr(args, n, None) is not None},
                                    source="federated options")
    recipe = make_config(args.config, channels=args.channels, tile=args.tile, batch=args.batch,
                         features=args.features, widths=args.widths, lr=args.lr, seed=args.seed,
                         pca_start=args.pca_start, init_output_bias=False)
    return RunSettings(federated=fed, train=recipe.to_dict(), out=str(Path(args.out).resolve()),
                       resume=bool(args.resume), sites=args.sites)


def _tls(args: argparse.Namespace, server: bool):
    from DeepDosimetricsLib.deep.federated.launch import Tls

    if server:
        return Tls(ca=args.ssl_ca_certfile, cert=args.ssl_certfile, key=args.ssl_keyfile).check(server=True)
    tls = Tls(ca=args.root_certificates).check(server=False)
    if tls is None and not args.insecure:
        raise InputError("give --root-certificates CA.pem (TLS), or --insecure for a trial on one machine")
    return tls


def _site_cohorts(pairs: list[str]) -> dict[str, str]:
    sites: dict[str, str] = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--site {pair!r}: expected NAME=DIR")
        if name in sites:
            raise InputError(f"--site {name} is given twice")
        sites[name] = folder
    return sites


def _finished(status: dict[str, Any], out: str) -> int:
    print(f"model: {out} ({status.get('rounds_done')} round(s) this run, {status.get('rounds')} in all)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch on the role."""
    from DeepDosimetricsLib.deep.federated import launch

    role = getattr(args, "role", None)
    if role is None:
        raise InputError("choose a role: deepdosimetrics federated server | site | local (see --help)")
    if role == "site":
        from DeepDosimetricsLib.deep.federated.site import SiteSettings

        site = SiteSettings(cohort=args.cohort, name=args.name, cache=args.cache, device=args.device,
                            threads=args.threads, audit=args.audit)
        auth = launch.NodeAuth(private_key=args.auth_private_key) if args.auth_private_key else None
        code = launch.run_site(site, args.server, _tls(args, server=False), auth, args.runtime_port)
        return 0 if code in (0, 130, -15, 143) else 2
    settings = _run_settings(args)
    if role == "server":
        auth = launch.NodeAuth(public_keys=list(args.site_public_key)) if args.site_public_key else None
        tls = _tls(args, server=True)
        if auth and tls is None:
            raise InputError("node authentication (--site-public-key) needs TLS (--ssl-* files)")
        status = launch.serve(settings, args.address, tls, auth)
        return _finished(status, settings.out)
    sites = _site_cohorts(args.site_cohorts)
    status = launch.run_local(settings, sites, cache_root=args.cache_root, audit_root=args.audit,
                              threads=args.threads, device=args.device)
    return _finished(status, settings.out)
