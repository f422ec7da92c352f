"""FederatedConfig: what a federation depends on (rounds, local steps, strategy, sites, privacy), and the
run configuration Flower carries from the server to the ServerApp and the sites."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

from DeepDosimetricsLib.runtime.configs import dataclass_from_dict
from DeepDosimetricsLib.runtime.errors import InputError

#: aggregation strategies: FedAvg weighted by tiles seen; FedProx adds mu/2 |w - w_global|^2 to each site's loss
STRATEGIES = ("fedavg", "fedprox")
#: the Flower release the federation is written against (pyproject's `federated` extra pins it)
FLOWER_VERSION = "1.42.0"


@dataclass
class FederatedConfig:
    """A federation's settings (saved in model.json under ``federated`` and in each round checkpoint)."""

    rounds: int = 10
    local_steps: int = 50  # optimisation steps each site runs per round on its own tiles
    strategy: str = "fedavg"  # one of STRATEGIES
    fedprox_mu: float = 0.01  # FedProx: weight of the proximal term (strategy fedprox only)
    min_sites: int = 2  # sites needed to start a round and to aggregate it
    round_timeout: float = 600.0  # seconds a round waits for every site; then the replies at hand (up to 2x for min_sites)
    round_retries: int = 2  # a round with fewer than min_sites replies is repeated this often, then the run stops
    dp_noise: float = 0.0  # differential privacy (Flower's client-side fixed clipping): noise multiplier (0: off)
    dp_clipping: float = 1.0  # clipping norm of each site's update (with dp_noise > 0)
    seed: int = 0

    def __post_init__(self) -> None:
        self.strategy = str(self.strategy).lower()
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        for name in ("rounds", "local_steps", "min_sites"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.round_retries < 0:
            raise InputError(f"round-retries must be >= 0, got {self.round_retries}")
        if self.round_timeout <= 0:
            raise InputError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if self.fedprox_mu < 0 or self.dp_noise < 0 or self.dp_clipping <= 0:
            raise InputError("fedprox-mu and dp-noise must be >= 0 and dp-clipping > 0")

    @property
    def differential_privacy(self) -> bool:
        return self.dp_noise > 0

    @property
    def proximal_mu(self) -> float:
        """The proximal weight the sites apply (0 under FedAvg)."""
        return float(self.fedprox_mu) if self.strategy == "fedprox" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "federated configuration") -> FederatedConfig:
        return dataclass_from_dict(cls, data, source, "federated")


@dataclass
class RunSettings:
    """What the ServerApp reads from Flower's run configuration: the federation, the training recipe every
    site trains with, where the model goes, and whether to continue from its round checkpoint."""

    federated: FederatedConfig
    train: dict[str, Any]  # TrainConfig.to_dict(): model architecture, tile, batch, lr, loss terms
    out: str
    resume: bool = False
    sites: Optional[int] = None  # sites expected (DP's num_sampled_clients; default min_sites)

    def to_run_config(self) -> dict[str, Any]:
        """Flat scalar values (Flower's run configuration holds str, int, float, bool)."""
        return {"federated": json.dumps(self.federated.to_dict()), "train": json.dumps(self.train),
                "out": str(self.out), "resume": bool(self.resume), "sites": int(self.sites or 0)}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        try:
            return cls(federated=FederatedConfig.from_dict(json.loads(str(run_config["federated"]))),
                       train=dict(json.loads(str(run_config["train"]))), out=str(run_config["out"]),
                       resume=bool(run_config.get("resume", False)), sites=int(run_config.get("sites", 0)) or None)
        except (KeyError, json.JSONDecodeError) as error:
            raise InputError(f"the federation's run configuration is incomplete ({error})") from error


__all__ = ["FederatedConfig", "RunSettings", "STRATEGIES", "FLOWER_VERSION"]
