"""Federated pre-training on Flower (issue 19) with real processes on localhost: a local federation writes a
model `encode` takes; what a site sends is only the model's weights and scalar metrics; a round checkpoint
resumes; differential privacy is stated in the model card; a killed site does not stop the federation
(FedProx); bad input gives one clear error. Tiny models on phantom sites, so the rounds take seconds of
compute (the rest is Flower starting its processes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from DeepDosimetricsLib.cli import main

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'deepdosimetrics[federated]')")

TINY = dict(channels="window:soft_tissue,mask:PTV,dose", tile=16, batch=2, features=4, widths=[4, 8], groups=2,
            val_fraction=0.5, val_tiles=2, edge_share=0.0, num_workers=0, pca_start=False)
LIB_ROOT = Path(__file__).resolve().parents[2] / "DeepDosimetrics"


@pytest.fixture(scope="module")
def sites(phantom_cohort, tmp_path_factory) -> dict[str, Path]:
    """Three phantom sites (the four phantoms: A holds two, B and C one each), a tiny recipe, and a
    cache folder per site (built in the first round, reused after)."""
    import shutil

    top = tmp_path_factory.mktemp("federated")
    ids = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())
    layout = {"A": ids[:2], "B": ids[2:3], "C": ids[3:4]}
    paths: dict[str, Path] = {}
    for name, members in layout.items():
        for pid in members:
            shutil.copytree(phantom_cohort / pid, top / name / pid)
        paths[name] = top / name
    paths["recipe"] = top / "tiny.yaml"
    paths["recipe"].write_text(yaml.safe_dump(TINY))
    paths["caches"] = top / "caches"
    paths["ids"] = ids  # type: ignore[assignment]
    return paths


def _rounds(out: Path) -> list[dict]:
    return json.loads((out / "model.json").read_text())["training"]["federated"]["history"]


@pytest.mark.slow
def test_local_federation_model_messages_resume_and_privacy(sites, tmp_path, capsys):
    """Two sites, one round: a model folder encode takes, and the audit of every message the sites sent
    holds the model's arrays and scalar metrics only; then --resume adds a second round with differential
    privacy, stated in model.json and MODEL_CARD.md."""
    import torch
    from DeepDosimetricsLib.deep.model import load_model

    out, audit = tmp_path / "model", tmp_path / "audit"
    common = ["federated", "local", "--site", f"A={sites['A']}", "--site", f"B={sites['B']}", "--out", str(out),
              "--local-steps", "2", "--config", str(sites["recipe"]), "--cache-root", str(sites["caches"]),
              "--audit", str(audit), "--threads", "1"]
    assert main([*common, "--rounds", "1"]) == 0
    assert "model: " in capsys.readouterr().out
    model, config = load_model(out)
    assert [r["round"] for r in _rounds(out)] == [1] and _rounds(out)[0]["sites"] == 2
    assert (out / "federated-checkpoint.pt").is_file() and (out / "rounds.csv").is_file()

    encoded = tmp_path / "encoded"
    assert main(["encode", "--model", str(out), "--cohort", str(sites["A"]), "--cache", str(sites["caches"] / "A"),
                 "--out", str(encoded), "--quiet", "--device", "cpu"]) == 0
    assert all((encoded / pid / "features.csv").is_file() for pid in sites["ids"][:2])

    # resume: round 2 only, with differential privacy (client-side clipping, noise on the average)
    assert main([*common, "--rounds", "2", "--resume", "--dp-noise", "0.001", "--dp-clipping", "5"]) == 0
    assert [r["round"] for r in _rounds(out)] == [1, 2]
    meta = json.loads((out / "model.json").read_text())["training"]["federated"]
    assert meta["differential_privacy"]["enabled"] and meta["differential_privacy"]["clipping_norm"] == 5.0
    assert "noise multiplier 0.001" in (out / "MODEL_CARD.md").read_text()

    # what left the sites: per message, the model's arrays (names, shapes, dtype) and scalar metrics only
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    texts = [pid.encode() for pid in sites["ids"]] + [str(sites[n]).encode() for n in "ABC"]
    for name in ("A", "B"):
        described = sorted((audit / name).glob("*.json"))
        kinds = [json.loads(path.read_text())["message_type"] for path in described]
        assert kinds == ["query.admission", "train"] * 2, kinds  # per run: round 0's admission, the round
        for path in described:
            message = json.loads(path.read_text())
            payload = path.with_suffix(".bin").read_bytes()
            assert message["error"] is None
            assert not [t for t in texts if t in payload], "an id or a path left the site"
            content = message["content"]
            if message["message_type"] == "query.admission":  # aggregate statistics: scalars and labels
                assert not content["arrays"] and list(content["configs"]) == ["statistics"]
                statistics = content["configs"]["statistics"]
                assert statistics["site"] == name and statistics["patients"] == len(list(sites[name].iterdir()))
                assert all(isinstance(v, (int, float, str)) for v in statistics.values())
                continue
            assert list(content["arrays"]) == ["arrays"] and not content["configs"]
            arrays = content["arrays"]["arrays"]
            assert {k: v["shape"] for k, v in arrays.items()} == shapes
            assert {v["dtype"] for v in arrays.values()} == {"float32"}
            metrics = content["metrics"]["metrics"]
            assert all(isinstance(v, (int, float)) for v in metrics.values()), metrics
            assert set(metrics) - {"tiles", "steps", "train-loss", "val-loss", "patients"} == \
                {f"val-mse[{label}]" for label in config.channels}
            # the bytes hold the arrays and little else: no tile of voxels hides beside them
            weights = sum(int(torch.tensor(v["shape"]).prod()) * 4 for v in arrays.values())
            assert weights <= len(payload) < weights + 64 * 1024


@pytest.mark.slow
def test_round_zero_names_a_cgy_site_and_fits_the_pca_start(sites, tmp_path, capsys):
    """Round 0: site D's doses are in cGy: it is named and left out of every round; the PCA start is fitted
    from A's and B's sums (the model's PCA path is set, its convolutions start at zero gain)."""
    import shutil

    import SimpleITK as sitk
    from DeepDosimetricsLib.deep.model import load_model

    bad = tmp_path / "cGy"
    shutil.copytree(sites["C"], bad)
    for dose_path in bad.glob("*/dose.nrrd"):
        image = sitk.ReadImage(str(dose_path))
        scaled = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 100.0)
        scaled.CopyInformation(image)
        sitk.WriteImage(scaled, str(dose_path), True)
    recipe = tmp_path / "pca.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "pca_start": True, "pca_tiles": 16}))
    out = tmp_path / "model"
    assert main(["federated", "local", "--site", f"A={sites['A']}", "--site", f"B={sites['B']}", "--site", f"D={bad}",
                 "--out", str(out), "--rounds", "1", "--local-steps", "1", "--config", str(recipe), "--min-sites", "2",
                 "--cache-root", str(sites["caches"]), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())["training"]["federated"]
    assert list(meta["admission"]["refused"]) == ["D"] and sorted(meta["admission"]["admitted"]) == ["A", "B"]
    assert "D" in printed and meta["pca_start"]["sites"] == 2 and meta["pca_start"]["tiles"] >= 32
    assert meta["history"][0]["sent"] == 2 and meta["history"][0]["sites"] == 2
    model, config = load_model(out)
    assert config.pca_start and float(model.state_dict()["pca_axes"].abs().sum()) > 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "DeepDosimetricsLib.cli", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(LIB_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _certificates(folder: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost, signed by it (the `cryptography` package)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    paths = {}

    def write(name: str, key, certificate) -> None:
        (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        paths[name] = str(folder / f"{name}.pem")
        paths[f"{name}-key"] = str(folder / f"{name}.key")

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    write("server", key, server)
    return paths


def _site_key(folder: Path, name: str) -> tuple[str, str]:
    """A site's EC P-384 key pair in OpenSSH format (what ssh-keygen -t ecdsa -b 384 writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}_key", folder / f"{name}_key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return str(private), str(public)


@pytest.mark.slow
def test_a_killed_site_does_not_stop_the_federation(sites, tmp_path):
    """`federated server` and three `federated site` processes over TLS (certificates made here) with node
    authentication (a fourth site with an unregistered key is never sent a round); site C is killed (SIGKILL,
    its whole process group) when its first round arrives: the rounds go on with A and B (FedProx) and the
    model is written."""
    from DeepDosimetricsLib.deep.federated.launch import free_port, stop
    from DeepDosimetricsLib.deep.model import load_model

    out = tmp_path / "model"
    address = f"127.0.0.1:{free_port()}"
    tls = _certificates(tmp_path)
    keys = {name: _site_key(tmp_path, name) for name in "ABCD"}
    server = subprocess.Popen(
        _cli("federated", "server", "--address", address, "--out", str(out), "--rounds", "2", "--local-steps", "2",
             "--strategy", "fedprox", "--mu", "0.1", "--sites", "3", "--min-sites", "2", "--round-timeout", "40",
             "--config", str(sites["recipe"]), "--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["server"],
             "--ssl-keyfile", tls["server-key"], *[f"--site-public-key={keys[n][1]}" for n in "ABC"]),
        env=_env(), stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    nodes = {}
    try:
        deadline = time.monotonic() + 120
        while "sites may connect" not in (tmp_path / "server.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        for name in "ABCD":
            nodes[name] = subprocess.Popen(
                _cli("federated", "site", "--cohort", str(sites[name if name != "D" else "A"]), "--name", name,
                     "--server", address, "--auth-private-key", keys[name][0],
                     "--root-certificates", tls["ca"], "--runtime-port", str(free_port()), "--threads", "1",
                     "--cache", str(sites["caches"] / (name if name != "D" else "A"))),
                env=_env(), stdout=open(tmp_path / f"site-{name}.log", "wb"), stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 240
        while "Receiving: train message" not in (tmp_path / "site-C.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        os.killpg(nodes["C"].pid, signal.SIGKILL)
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop(server, *nodes.values(), grace=5)
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["sites"] == 2 and rounds[0]["sent"] == 3 and rounds[1]["sent"] <= 3
    assert "Receiving: train message" not in (tmp_path / "site-D.log").read_text(errors="replace")
    meta = json.loads((out / "model.json").read_text())["training"]["federated"]
    assert meta["strategy"] == "fedprox" and meta["fedprox_mu"] == 0.1
    load_model(out)


def test_fedprox_keeps_a_site_near_the_global_weights(sites):
    """One site round in this process: the proximal term (mu) keeps the weights nearer the global ones."""
    import torch
    from DeepDosimetricsLib.deep.federated.config import FederatedConfig, RunSettings
    from DeepDosimetricsLib.deep.federated.server import initial_model
    from DeepDosimetricsLib.deep.federated.site import SiteSettings, train_round
    from DeepDosimetricsLib.deep.train.training import make_config

    recipe = make_config(sites["recipe"], pca_start=False, init_output_bias=False, lr=0.05, threads=1)
    run = RunSettings(FederatedConfig(rounds=1, local_steps=4, strategy="fedprox"), recipe.to_dict(), out="unused")
    model, _ = initial_model(run)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    site = SiteSettings(cohort=str(sites["A"]), name="A", cache=str(sites["caches"] / "A"), device="cpu", threads=1)
    distance = {}
    for mu in (0.0, 1000.0):
        state, metrics = train_round(site, run, start, 1, proximal_mu=mu)
        assert metrics["tiles"] == 4 * TINY["batch"] and metrics["steps"] == 4
        distance[mu] = sum(float(((state[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    assert 0 < distance[1000.0] < 0.5 * distance[0.0], distance
    del torch


def test_bad_input_gives_one_clear_error(sites, tmp_path, capsys):
    base = ["--out", str(tmp_path / "m"), "--config", str(sites["recipe"])]
    cases = [
        (["federated", "local", "--site", f"A={tmp_path / 'missing'}", *base], "site A: cohort folder"),
        (["federated", "local", "--site", f"A={sites['A']}", "--strategy", "fedmedian", *base], "unknown strategy"),
        (["federated", "local", "--site", "A", *base], "expected NAME=DIR"),
        (["federated", "site", "--cohort", str(sites["A"]), "--server", "127.0.0.1:1"], "--insecure"),
        (["federated", "site", "--cohort", str(tmp_path / "missing"), "--server", "127.0.0.1:1", "--insecure"],
         "does not exist"),
        (["federated", "server", "--ssl-certfile", str(tmp_path / "c.pem"), *base], "TLS needs"),
        (["federated", "local", "--site", f"A={sites['A']}", "--rounds", "0", *base], "rounds must be >= 1"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and "Traceback" not in err, (argv, err)


def test_the_app_bundle_names_this_library_and_carries_the_run(tmp_path):
    import tomllib
    from DeepDosimetricsLib.deep.federated.config import FLOWER_VERSION, FederatedConfig, RunSettings
    from DeepDosimetricsLib.deep.federated.launch import write_app

    run = RunSettings(FederatedConfig(rounds=3, strategy="fedprox"), {"tile": 16}, out=str(tmp_path / "m"))
    app = tomllib.loads((write_app(tmp_path / "app", run) / "pyproject.toml").read_text())
    flwr_app = app["tool"]["flwr"]["app"]
    assert flwr_app["components"]["clientapp"].startswith("DeepDosimetricsLib.deep.federated.apps:")
    assert RunSettings.from_run_config(flwr_app["config"]) == run
    assert app["project"]["dependencies"] == [f"flwr=={FLOWER_VERSION}"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", FLOWER_VERSION)
