"""Flower's ServerApp and ClientApp of the federation: the components of the Flower app bundle that
``launch.py`` submits (``deep.federated.apps:server_app`` / ``:client_app``). Imported by Flower's
``flwr-serverapp`` and ``flwr-clientapp`` processes only (it imports Flower at the top).

A site's reply holds ``arrays`` (the model's state dict: its names and shapes) and ``metrics`` (counts and
scalar losses, see ``site.train_round``). A failure at a site goes back as an error with a fixed reason (the
site's own console has the details), so no file name or patient id leaves in an error text either.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from DeepDosimetricsLib.deep.federated.config import RunSettings
from DeepDosimetricsLib.deep.federated.site import (
    SiteSettings,
    admission_statistics,
    pca_statistics,
    train_round,
)
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

log = logging.getLogger(__name__)

#: the node-config key naming the site's settings file (written by `federated site`)
SETTINGS_KEY = "settings"
#: the error code a failed site round replies with
SITE_FAILED = 1001


def _site(context: Context) -> SiteSettings:
    return SiteSettings.load(str(context.node_config[SETTINGS_KEY]))


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: records every reply the site sends (after DP clipping) when the site keeps an audit."""
    from DeepDosimetricsLib.deep.federated.audit import record_reply

    reply = call_next(msg, context)
    folder = _site(context).audit
    if folder:
        record_reply(Path(folder), reply)
    return reply


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side fixed clipping (preview) when the federation asks for differential privacy."""
    from flwr.clientapp.mod import fixedclipping_mod

    if (msg.metadata.message_type == MessageType.TRAIN
            and RunSettings.from_run_config(dict(context.run_config)).federated.differential_privacy):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(mods=[audit_mod, dp_mod])


@client_app.train()
def site_round(msg: Message, context: Context) -> Message:
    """One round at a site: the global weights in, the site's weights, counts and scalar metrics out."""
    import torch  # noqa: F401 - Flower's ArrayRecord converts state dicts only when torch is imported

    site = None
    try:
        site = _site(context)
        run = RunSettings.from_run_config(dict(context.run_config))
        config = msg.content["config"]
        weights = msg.content["arrays"].to_torch_state_dict()
        state, metrics = train_round(site, run, weights, int(config["server-round"]),
                                     float(config.get("proximal-mu", 0.0)))
    except Exception as error:  # noqa: BLE001 - reported here, a fixed reason travels
        name = site.name if site else "?"
        log.error("site %s: round failed: %s", name, error, exc_info=True)
        print(f"site {name}: round failed: {error}", flush=True)
        return Message(Error(code=SITE_FAILED, reason="the site's round failed (details in the site's log)"),
                       reply_to=msg)
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _guarded(msg: Message, context: Context, work) -> Message:
    """``work(site, run) -> RecordDict`` as the reply; a failure replies with the fixed reason."""
    import torch  # noqa: F401 - Flower's ArrayRecord converts state dicts only when torch is imported

    site = None
    try:
        site = _site(context)
        return Message(work(site, RunSettings.from_run_config(dict(context.run_config))), reply_to=msg)
    except Exception as error:  # noqa: BLE001 - reported here, a fixed reason travels
        name = site.name if site else "?"
        log.error("site %s: %s failed: %s", name, msg.metadata.message_type, error, exc_info=True)
        print(f"site {name}: {msg.metadata.message_type} failed: {error}", flush=True)
        return Message(Error(code=SITE_FAILED, reason="the site's round failed (details in the site's log)"),
                       reply_to=msg)


@client_app.query("admission")
def site_admission(msg: Message, context: Context) -> Message:
    """Round 0: the site's input statistics (scalars and labels) for the server's admission check."""
    return _guarded(msg, context, lambda site, run: RecordDict(
        {"statistics": ConfigRecord(admission_statistics(site, run))}))


@client_app.query("pca")
def site_pca(msg: Message, context: Context) -> Message:
    """Round 0: the site's sums over its tiles for one pass of the federated PCA start."""

    def work(site: SiteSettings, run: RunSettings) -> RecordDict:
        arrays = msg.content["arrays"].to_numpy_ndarrays() if "arrays" in msg.content else []
        out_arrays, scalars = pca_statistics(site, run, arrays, dict(msg.content["config"]))
        return RecordDict({"arrays": ArrayRecord(out_arrays), "metrics": MetricRecord(scalars)})

    return _guarded(msg, context, work)


server_app = ServerApp()


@server_app.main()
def federation(grid: Grid, context: Context) -> None:
    """The server's rounds (server.run_federation); a failure is written to federation.json."""
    from DeepDosimetricsLib.deep.federated.server import run_federation, write_failure

    run = RunSettings.from_run_config(dict(context.run_config))
    try:
        run_federation(grid, run, say=lambda text: print(text, flush=True))
    except DeepDosimetricsError as error:  # a clear message; the command prints it and exits 2
        write_failure(Path(run.out), error)
        print(f"error: {error}", flush=True)
    except Exception as error:
        write_failure(Path(run.out), error)
        raise


__all__ = ["client_app", "server_app", "SETTINGS_KEY"]
