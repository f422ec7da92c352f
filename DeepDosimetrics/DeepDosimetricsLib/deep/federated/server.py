"""The aggregating side: round 0, the rounds, a checkpoint per round, resume, and the model folder it leaves.

``run_federation(grid, run)`` runs inside Flower's ServerApp: it starts from seeded weights (or the round
checkpoint with ``resume``); :func:`round_zero` checks every site's input statistics (admission: a
mismatching site is named and left out) and, on a new federation with ``pca_start``, fits the PCA start from
the admitted sites' sums; then per round it sends the global weights to the sites, waits up to
``round_timeout`` for their replies (twice that while fewer than ``min_sites`` replied), aggregates those
that came (FedAvg weighted by tiles seen, or FedProx; wrapped by Flower's client-side fixed-clipping DP when
``dp_noise`` > 0) when at least ``min_sites`` replied (else repeats the round), and writes the round
checkpoint atomically. A site that disconnects mid-round is missing from that round's average, never a stop
or a partial average. At the end: ``model.json`` + ``model.pt`` (loadable by ``encode``, the panel and the
review station), ``rounds.csv``, ``MODEL_CARD.md`` and ``federation.json`` (the status the ``federated
server`` command reads).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from DeepDosimetricsLib.deep.federated.config import FLOWER_VERSION, FederatedConfig, RunSettings
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError

log = logging.getLogger(__name__)

CHECKPOINT = "federated-checkpoint.pt"
CHECKPOINT_FORMAT = "deepdosimetrics-federated-checkpoint"
STATUS = "federation.json"
ROUNDS_CSV = "rounds.csv"
MODEL_CARD = "MODEL_CARD.md"
#: the metric each reply carries as its FedAvg weight
WEIGHT_KEY = "tiles"


def train_config_of(run: RunSettings):
    """The federation's TrainConfig (InputError for what a federation cannot do yet)."""
    from DeepDosimetricsLib.deep.train.training import TrainConfig

    return TrainConfig.from_dict(dict(run.train), source="federated training recipe")


def initial_model(run: RunSettings):
    """The seeded starting model (as ``train`` would build it: torch.manual_seed(seed)) and its ModelConfig."""
    import torch

    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels
    from DeepDosimetricsLib.deep.model import TileAutoencoder
    from DeepDosimetricsLib.deep.train.training import model_config_for

    config = train_config_of(run)
    model_config = model_config_for(config, channel_labels(parse_channels(config.channels)))
    torch.manual_seed(config.seed)
    return TileAutoencoder(model_config), model_config


# ------------------------------------------------------------------------------------- checkpoints
def save_round_checkpoint(out: Path, completed: int, weights: dict[str, Any], history: list[dict[str, Any]],
                          run: RunSettings) -> Path:
    """The state after ``completed`` rounds, written atomically (a killed server loses at most one round)."""
    from DeepDosimetricsLib.runtime.atomic import torch_save_atomic

    return torch_save_atomic({"format": CHECKPOINT_FORMAT, "round": int(completed), "weights": weights,
                              "history": json.dumps(history), "federated": json.dumps(run.federated.to_dict()),
                              "train": json.dumps(run.train)}, out / CHECKPOINT)


def load_round_checkpoint(path: Path) -> dict[str, Any]:
    """A round checkpoint (weights-only unpickling), InputError when damaged or foreign."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one message
        raise InputError(f"{path}: unreadable federated checkpoint ({error})") from error
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a DeepDosimetrics federated checkpoint")
    data["history"] = json.loads(data["history"])
    data["federated"] = json.loads(data["federated"])
    data["train"] = json.loads(data["train"])
    return data


def starting_state(run: RunSettings) -> tuple[Any, Any, int, list[dict[str, Any]]]:
    """(model, model config, rounds already done, history): seeded, or from the round checkpoint."""
    from DeepDosimetricsLib.deep.model import plain_state_dict

    out = Path(run.out)
    model, model_config = initial_model(run)
    path = out / CHECKPOINT
    if path.exists() and not run.resume:
        raise InputError(f"{out} already holds a federated checkpoint; pass --resume to continue it, "
                         "or choose another --out")
    if not (run.resume and path.exists()):
        return model, model_config, 0, []
    checkpoint = load_round_checkpoint(path)
    if checkpoint["train"] != run.train:
        log.warning("resuming with the checkpoint's training recipe (ignoring this call's)")
        run.train = checkpoint["train"]
        model, model_config = initial_model(run)
    expected = {k: tuple(v.shape) for k, v in plain_state_dict(model).items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["weights"].items()}
    if expected != found:
        raise InputError(f"{path}: its weights do not fit the model of the recipe")
    model.load_state_dict(checkpoint["weights"])
    return model, model_config, int(checkpoint["round"]), list(checkpoint["history"])


# ------------------------------------------------------------------------------------- strategy
def make_strategy(fed: FederatedConfig, sites: Optional[int] = None):
    """Flower's FedAvg or FedProx (weighted by tiles seen, no federated evaluation round: each reply carries
    the global weights' validation loss), wrapped by client-side fixed-clipping DP when asked."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=fed.min_sites,
                  min_evaluate_nodes=0, min_available_nodes=fed.min_sites, weighted_by_key=WEIGHT_KEY)
    strategy = FedProx(proximal_mu=fed.fedprox_mu, **common) if fed.strategy == "fedprox" else FedAvg(**common)
    if fed.differential_privacy:
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=fed.dp_noise, clipping_norm=fed.dp_clipping,
            num_sampled_clients=int(sites or fed.min_sites))
    return strategy


# ------------------------------------------------------------------------------------- round 0
def query_sites(grid: Any, nodes: list[int], action: str, records: dict[str, Any], timeout: float,
                strict: bool = True) -> tuple[list, set]:
    """One query to every node in ``nodes`` (``query.<action>``): the usable replies and the nodes that gave
    none (``strict``: DeepDosimetricsError when any)."""
    from flwr.app import Message, RecordDict

    messages = [Message(content=RecordDict(dict(records)), message_type=f"query.{action}", dst_node_id=node)
                for node in nodes]
    replies = [r for r in collect_replies(grid, messages, timeout, len(nodes)) if not r.has_error()]
    silent = set(nodes) - {r.metadata.src_node_id for r in replies}
    if silent and strict:
        raise DeepDosimetricsError(f"round 0 ({action}): {len(silent)} of {len(nodes)} site(s) did not answer "
                                   "(see their logs)")
    return replies, silent


def admit_sites(grid: Any, run: RunSettings, nodes: list[int], say: Callable[[str], None]) -> tuple[set, dict]:
    """Admission (admission.check_sites on every site's statistics): the refused nodes and the report."""
    from flwr.app import ConfigRecord

    from DeepDosimetricsLib.deep.federated.admission import SiteStatistics, check_sites

    replies, silent = query_sites(grid, nodes, "admission", {"config": ConfigRecord({})}, run.federated.round_timeout,
                                  strict=False)
    for node in sorted(silent):
        say(f"round 0: the site of node {node} sent no statistics (see its log): left out")
    statistics, node_of = {}, {}
    for reply in replies:
        values = dict(reply.content["statistics"])
        name = str(values.pop("site", "site"))
        if name in statistics:
            name = f"{name} (node {reply.metadata.src_node_id})"
        statistics[name] = SiteStatistics.from_metrics(values)
        node_of[name] = reply.metadata.src_node_id
    report = check_sites(statistics)
    for line in report.format().splitlines():
        say(line)
    report.require(run.federated.min_sites)
    return {node_of[name] for name in report.refused} | silent, {**report.to_dict(), "silent_nodes": len(silent)}


def federated_pca_start(grid: Any, run: RunSettings, nodes: list[int], model: Any,
                        say: Callable[[str], None]) -> dict[str, Any]:
    """The PCA start fitted from the admitted sites' sums (pca_rounds.FederatedPca: a mean pass, subspace
    iterations, a final pass; the sums add up to the pooled fit), set in the model; its summary."""
    from flwr.app import ArrayRecord, ConfigRecord

    from DeepDosimetricsLib.deep.federated.pca_rounds import FederatedPca, statistics_from_message

    config = train_config_of(run)
    fit = FederatedPca(config.features, seed=config.seed)
    started = time.perf_counter()
    while not fit.done:
        arrays, scalars = fit.request().to_message()
        records: dict[str, Any] = {"config": ConfigRecord(scalars)}
        if arrays:
            records["arrays"] = ArrayRecord(list(arrays))
        replies, _ = query_sites(grid, nodes, "pca", records, run.federated.round_timeout)
        fit.merge([statistics_from_message(r.content["arrays"].to_numpy_ndarrays(), dict(r.content["metrics"]))
                   for r in replies])
        say(f"round 0: PCA pass {fit.round} of {fit.rounds} over {len(replies)} site(s)")
    basis = fit.finish()
    model.set_pca_basis(basis.mean, basis.axes, basis.variances)
    return {"tiles": int(basis.tiles), "variance_kept": float(basis.variances.sum() / basis.total_variance),
            "sites": len(nodes), "seconds": round(time.perf_counter() - started, 1)}


def round_zero(grid: Any, run: RunSettings, model: Any, completed: int,
               say: Callable[[str], None] = print) -> tuple[set, dict[str, Any]]:
    """Before the rounds: every site's input statistics are checked (harmonisation: HU, dose scale, spacing,
    channels; a mismatching site is named and left out of every round, not averaged in), then, on a new
    federation with ``pca_start``, the PCA start is fitted from the admitted sites' sums. Returns the
    refused nodes and what model.json records (``admission``, ``pca_start``)."""
    nodes = sorted(grid.get_node_ids())
    refused, admission = admit_sites(grid, run, nodes, say)
    extra: dict[str, Any] = {"admission": admission}
    if completed == 0 and train_config_of(run).pca_start:
        extra["pca_start"] = federated_pca_start(grid, run, [n for n in nodes if n not in refused], model, say)
    return refused, extra


# ------------------------------------------------------------------------------------- the rounds
def run_federation(grid: Any, run: RunSettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the remaining rounds of ``run``; write the model folder and the status. The summary."""
    from flwr.app import ArrayRecord, ConfigRecord

    from DeepDosimetricsLib.deep.model import plain_state_dict
    from DeepDosimetricsLib.runtime.progress import emit_progress

    fed, out = run.federated, Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    model, model_config, completed, history = starting_state(run)
    started = time.perf_counter()
    strategy = make_strategy(fed, run.sites)
    if completed:
        say(f"resuming after round {completed} of {fed.rounds} ({out / CHECKPOINT})")
    if run.sites:
        wait_for_sites(grid, run.sites, fed.round_timeout, say)
    refused, extra = round_zero(grid, run, model, completed, say)
    arrays = ArrayRecord(plain_state_dict(model))
    failures = 0
    server_round = completed + 1
    while server_round <= fed.rounds:
        round_start = time.perf_counter()
        config = ConfigRecord({"local-steps": int(fed.local_steps)})
        messages = [m for m in strategy.configure_train(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in refused]
        replies = collect_replies(grid, messages, fed.round_timeout, fed.min_sites)
        good = [r for r in replies if not r.has_error()]
        for reply in replies:
            if reply.has_error():
                say(f"round {server_round}: a site failed ({reply.error.reason})")
        if len(good) < fed.min_sites:
            failures += 1
            say(f"round {server_round}: {len(good)} of {len(messages)} site(s) replied (minimum {fed.min_sites}); "
                + ("repeating the round" if failures <= fed.round_retries else "stopping"))
            if failures > fed.round_retries:
                raise DeepDosimetricsError(
                    f"round {server_round} got {len(good)} usable replies (minimum {fed.min_sites}) "
                    f"{fed.round_retries + 1} times; the last checkpoint (round {server_round - 1}) is intact: "
                    "start the sites and the server again with --resume")
            continue
        aggregated, metrics = strategy.aggregate_train(server_round, good)
        if aggregated is None:
            raise DeepDosimetricsError(f"round {server_round}: the replies could not be aggregated")
        arrays = aggregated
        failures = 0
        row = {"round": server_round, "sites": len(good), "sent": len(messages),
               "seconds": round(time.perf_counter() - round_start, 2),
               **{str(k): float(v) for k, v in (metrics or {}).items()}}
        history.append(row)
        weights = {k: v for k, v in arrays.to_torch_state_dict().items()}
        save_round_checkpoint(out, server_round, weights, history, run)
        say(f"round {server_round}/{fed.rounds}: {len(good)} of {len(messages)} site(s), "
            f"train loss {row.get('train-loss', float('nan')):.5g}, "
            f"validation loss of the global model {row.get('val-loss', float('nan')):.5g}")
        emit_progress("federated", server_round, fed.rounds, loss=row.get("train-loss"), val_loss=row.get("val-loss"))
        server_round += 1
    if history or completed:
        model.load_state_dict(load_round_checkpoint(out / CHECKPOINT)["weights"])
    summary = write_outputs(out, model, model_config, run, history, extra, time.perf_counter() - started)
    return summary


def collect_replies(grid: Any, messages: list, timeout: float, enough: int, poll: float = 0.5) -> list:
    """Send ``messages`` and gather the replies until every site replied, or ``timeout`` seconds passed with
    at least ``enough`` usable replies, or twice ``timeout`` passed (a late reply is still taken while the
    quorum is missing; a dead site's error reply, from Flower's heartbeat check, ends its wait)."""
    pending = set(grid.push_messages(messages))
    replies: list = []
    started = time.monotonic()
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        elapsed = time.monotonic() - started
        usable = sum(1 for reply in replies if not reply.has_error())
        if not pending or (elapsed >= timeout and usable >= enough) or elapsed >= 2 * timeout:
            break
        time.sleep(poll)
    return replies


def wait_for_sites(grid: Any, expected: int, timeout: float, say: Callable[[str], None]) -> int:
    """Wait up to ``timeout`` seconds for ``expected`` sites to connect; the number connected."""
    deadline = time.monotonic() + timeout
    connected = len(list(grid.get_node_ids()))
    while connected < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        connected = len(list(grid.get_node_ids()))
    say(f"{connected} site(s) connected" + ("" if connected >= expected else f" of {expected} expected"))
    return connected


def write_outputs(out: Path, model: Any, model_config: Any, run: RunSettings, history: list[dict[str, Any]],
                  extra: dict[str, Any], seconds: float) -> dict[str, Any]:
    """model.json + model.pt (the final global weights), rounds.csv, MODEL_CARD.md, federation.json."""
    import pandas as pd

    from DeepDosimetricsLib.deep.model import save_model
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic, write_json_atomic, write_text_atomic

    fed = run.federated
    summary = {
        "federated": {**fed.to_dict(), "flower": FLOWER_VERSION, "rounds_done": len(history),
                      "history": history, **extra,
                      "differential_privacy": privacy_statement(fed)},
        "train_config": dict(run.train), "steps": fed.rounds * fed.local_steps,
        "last_val_loss": history[-1].get("val-loss") if history else None,
        "training_seconds": round(seconds, 1),
    }
    save_model(out, model, model_config, extra=summary)
    write_csv_atomic(pd.DataFrame(history), out / ROUNDS_CSV)
    write_text_atomic(out / MODEL_CARD, model_card(fed, history))
    write_json_atomic(out / STATUS, {"status": "finished", "rounds_done": len(history), "rounds": fed.rounds})
    return summary


def privacy_statement(fed: FederatedConfig) -> dict[str, Any]:
    """What model.json and the model card say about differential privacy."""
    if not fed.differential_privacy:
        return {"enabled": False}
    return {"enabled": True, "mechanism": "Flower client-side fixed clipping + Gaussian noise on the average "
            "(DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod; marked preview by Flower)",
            "clipping_norm": fed.dp_clipping, "noise_multiplier": fed.dp_noise}


def model_card(fed: FederatedConfig, history: list[dict[str, Any]]) -> str:
    """A short model card: how the weights were trained, what left the sites, privacy."""
    dp = privacy_statement(fed)
    lines = ["# Federated DeepDosimetrics tile autoencoder", "",
             f"Trained with Flower {FLOWER_VERSION} over {len(history)} round(s) of {fed.local_steps} local steps per "
             f"site ({fed.strategy}" + (f", mu {fed.fedprox_mu}" if fed.strategy == "fedprox" else "") + "; "
             f"at least {fed.min_sites} sites per round, weighted by tiles seen).", "",
             "Only model weights, counts (tiles, steps, patients) and scalar losses left the sites; no image, "
             "tile or patient id.", ""]
    if dp["enabled"]:
        lines.append(f"Differential privacy: each site's update clipped to norm {dp['clipping_norm']}, Gaussian "
                     f"noise multiplier {dp['noise_multiplier']} on the average ({dp['mechanism']}).")
    else:
        lines.append("Differential privacy: off.")
    if history:
        last = history[-1]
        lines += ["", f"Last round: {last['sites']} site(s), validation loss of the global model on the sites' "
                  f"held-out tiles {last.get('val-loss', float('nan')):.5g}."]
    return "\n".join(lines) + "\n"


def write_failure(out: Path, error: BaseException) -> None:
    """federation.json saying why the run stopped (the command prints it and exits 2)."""
    from DeepDosimetricsLib.runtime.atomic import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATUS, {"status": "failed", "error": str(error)})


__all__ = ["run_federation", "round_zero", "make_strategy", "starting_state", "save_round_checkpoint",
           "load_round_checkpoint", "write_failure", "CHECKPOINT", "STATUS", "ROUNDS_CSV", "MODEL_CARD"]
