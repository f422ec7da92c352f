"""One site's part of a round: load the global weights, measure them on the site's held-out tiles, train
``local_steps`` steps on the site's own cohort and cache (the existing Trainer), hand back the new weights
with counts and scalar metrics. Nothing else leaves: no tile, voxel, patient id or file name."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from DeepDosimetricsLib.deep.federated.config import RunSettings
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class SiteSettings:
    """What a hospital chooses for its site (kept on the site; only ``name`` is sent, in round 0)."""

    cohort: str
    name: str = "site"
    cache: Optional[str] = None  # preprocessing cache folder (default: the cohort's default cache)
    device: str = "auto"
    threads: Optional[int] = None  # torch CPU threads of the site's training process
    audit: Optional[str] = None  # folder where every message the site sends is described (audit.py)

    def check(self) -> SiteSettings:
        """InputError naming the site when its cohort folder is missing or empty."""
        cohort = Path(self.cohort)
        if not cohort.is_dir():
            raise InputError(f"site {self.name}: cohort folder {cohort} does not exist")
        if not any(p.is_dir() for p in cohort.iterdir()):
            raise InputError(f"site {self.name}: cohort folder {cohort} holds no patient folder")
        return self

    def save(self, path: Union[str, Path]) -> Path:
        from DeepDosimetricsLib.runtime.atomic import write_json_atomic

        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Union[str, Path]) -> SiteSettings:
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, TypeError, json.JSONDecodeError) as error:
            raise InputError(f"site settings {path} cannot be read ({error})") from error


def site_train_config(run: RunSettings, site: SiteSettings):
    """The TrainConfig a site trains with: the server's recipe, the run's length in steps (rounds x local
    steps, so a cosine schedule follows the whole federation: it is applied per step from the global step),
    the site's device and threads. Starts (PCA, output biases) come from the server's weights, not here
    (``pca_start`` keeps the model's frozen PCA path: its buffers arrive with the weights)."""
    from DeepDosimetricsLib.deep.train.training import TrainConfig

    data = dict(run.train)
    fed = run.federated
    data.update(steps=fed.rounds * fed.local_steps, epochs=None, init_output_bias=False,
                device=site.device, compile=False)
    if data.get("schedule", "cosine") in ("cosine", "warmup_cosine"):
        if data.get("schedule", "cosine") == "cosine":
            data["warmup_fraction"] = 0.0
        data["schedule"] = "warmup_cosine"  # the rate from the global step (each round is a new process)
    else:
        data["schedule"] = "constant"
    if site.threads is not None:
        data["threads"] = int(site.threads)
    return TrainConfig.from_dict(data, source=f"site {site.name}: training recipe of the federation")


def open_trainer(site: SiteSettings, config: Any, work: Path) -> Any:
    """The site's Trainer, set up on its cohort and cache (its own starts skipped: the weights come from the
    server)."""
    from DeepDosimetricsLib.deep.distributed import DistributedContext
    from DeepDosimetricsLib.deep.train.training import Trainer

    trainer = Trainer(Path(site.cohort), work, config, DistributedContext(), quiet=True)
    trainer.external_start = True
    trainer.setup(cache_dir=Path(site.cache) if site.cache else None)
    return trainer


def admission_statistics(site: SiteSettings, run: RunSettings) -> dict[str, Union[int, float, str]]:
    """Round 0, admission: the site's input statistics (aggregate scalars, admission.site_statistics) and
    its name (so the server can name a mismatching site)."""
    from DeepDosimetricsLib.deep.federated.admission import cohort_statistics

    site.check()
    statistics = cohort_statistics(site.cohort, site.cache, channels=run.train.get("channels", "default"))
    return {"site": site.name, **statistics.to_metrics()}


def pca_statistics(site: SiteSettings, run: RunSettings, arrays: list, scalars: dict[str, Any]) -> tuple[list, dict]:
    """Round 0, the federated PCA start: the site's sums over its training tiles for the server's request
    (pca_rounds.site_pca_statistics; the same tiles in every pass, refused below MIN_SITE_TILES tiles)."""
    from DeepDosimetricsLib.deep.federated.pca_rounds import (
        PcaRequest,
        site_pca_statistics,
        statistics_to_message,
    )
    from DeepDosimetricsLib.deep.train.pca import sampler_batches

    site.check()
    config = site_train_config(run, site)
    request = PcaRequest.from_message(arrays, scalars)
    with tempfile.TemporaryDirectory(prefix="deepdosimetrics-site-") as work:
        trainer = open_trainer(site, config, Path(work))
        sums = site_pca_statistics(sampler_batches(trainer.sampler, config.pca_tiles), request)
    return statistics_to_message(sums)


def train_round(site: SiteSettings, run: RunSettings, weights: dict[str, Any], server_round: int,
                proximal_mu: float = 0.0) -> tuple[dict[str, Any], dict[str, Union[int, float]]]:
    """Train the global ``weights`` (a state dict) for one round on the site's data.

    Returns the new state dict (CPU tensors, the model's names and shapes) and scalar metrics: ``tiles``
    (tiles seen this round: the FedAvg weight), ``steps``, ``train-loss`` (mean over the round's steps),
    ``val-loss`` and ``val-mse[<channel>]`` (the global weights on the site's held-out tiles, before
    training), ``patients`` (training patients: a count)."""
    from DeepDosimetricsLib.deep.model import plain_state_dict

    started = time.perf_counter()
    site.check()
    config = site_train_config(run, site)
    fed = run.federated
    with tempfile.TemporaryDirectory(prefix="deepdosimetrics-site-") as work:
        trainer = open_trainer(site, config, Path(work))
        ready = time.perf_counter()
        try:
            trainer.model.load_state_dict(weights)
        except RuntimeError as error:
            raise InputError(f"site {site.name}: the server's weights do not fit the model ({error})") from error
        val_loss, per_channel = trainer.validate()
        if proximal_mu > 0:
            anchor = [p.detach().clone() for p in trainer.model.parameters()]

            def proximal(model) -> Any:
                return 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))

            trainer.penalty = proximal
        first = (max(1, int(server_round)) - 1) * fed.local_steps
        validated = time.perf_counter()
        losses = trainer.run_steps(first % max(1, config.total_steps), fed.local_steps)
        state = plain_state_dict(trainer.model)
        metrics: dict[str, Union[int, float]] = {
            "tiles": int(fed.local_steps * config.batch), "steps": int(len(losses)),
            "train-loss": float(sum(losses) / max(1, len(losses))),
            "val-loss": float(val_loss), "patients": int(len(trainer.train_ids)),
        }
        for label, mse in zip(trainer.labels, per_channel):
            metrics[f"val-mse[{label}]"] = float(mse)
    print(f"site {site.name}, round {server_round}: setup {ready - started:.1f} s, validation "
          f"{validated - ready:.1f} s, {len(losses)} steps {time.perf_counter() - validated:.1f} s", flush=True)
    if not all(math.isfinite(float(v)) for v in metrics.values()):
        raise InputError(f"site {site.name}: training diverged in round {server_round} (lower the learning rate)")
    return state, metrics


__all__ = ["SiteSettings", "site_train_config", "open_trainer", "train_round", "admission_statistics",
           "pca_statistics"]
