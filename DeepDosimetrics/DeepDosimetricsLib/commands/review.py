"""`deepdosimetrics review`: the browser review station of an encoding (trame + trame-slicer)."""

from __future__ import annotations

import argparse

from DeepDosimetricsLib.commands import describe_command

HELP = "browser review station: inspect reconstructions, DVHs and latent traversals, record verdicts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    describe_command(
        parser,
        ok="the station served until it was stopped",
        notes="Prints 'review station: URL' and serves until interrupted. Binds to 127.0.0.1 by default; any "
        "other --host requires an access token (--token, or one generated and printed in the URL): requests "
        "without it get 403. Only the encoded patients of the cohort are served, by id. The only file written "
        "is ENC_DIR/review.csv (patient,verdict,comment,reviewer,time).",
    )
    parser.add_argument("--encoding", required=True, metavar="ENC_DIR",
                        help="output folder of `deepdosimetrics encode --reconstruct`")
    parser.add_argument("--cohort", required=True, metavar="COHORT", help="the cohort that was encoded")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="the model that encoded it (a folder or a shipped model's name): enables the latent "
                        "traversal sliders")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="the preprocessing cache the encoding used (default: the cohort's default cache)")
    parser.add_argument("--predict", default=None, metavar="PREDICT_DIR",
                        help="output folder of `deepdosimetrics predict`: its summary is shown")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, metavar="N", help="port (default: a free one)")
    parser.add_argument("--token", default=None, metavar="T",
                        help="access token (at least 16 characters; default for a non-local --host: generated)")
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="CPU threads for decoding during traversal (default 2)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 on bad input (missing folders, a bad host or token)."""
    import os

    from DeepDosimetricsLib.review.catalog import Catalog
    from DeepDosimetricsLib.review.security import AccessPolicy
    from DeepDosimetricsLib.review.verdicts import VerdictStore
    from DeepDosimetricsLib.runtime.errors import InputError

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    policy = AccessPolicy.create(args.host, args.token)
    catalog = Catalog(args.encoding, args.cohort, args.predict)
    verdicts = VerdictStore(catalog.encoding_dir, catalog.check_id)
    traverser = None
    if args.model:
        from DeepDosimetricsLib.review.traversal import Traverser

        traverser = Traverser(args.model, catalog, args.cache, threads=args.threads)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from DeepDosimetricsLib.review.app import ReviewApp

    app = ReviewApp(catalog, verdicts, policy, traverser)
    app.start(port=args.port)
    return 0
