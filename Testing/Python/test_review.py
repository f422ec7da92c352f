"""Review station without a browser: patient ids, verdicts, the access policy and its HTTP/websocket gate."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from DeepDosimetricsLib.review.catalog import Catalog, metrics_table
from DeepDosimetricsLib.review.security import AccessPolicy, is_loopback, make_middleware
from DeepDosimetricsLib.review.verdicts import VerdictStore
from DeepDosimetricsLib.runtime.errors import InputError


@pytest.fixture(scope="module")
def encoding(phantom_cohort, tmp_path_factory) -> Path:
    """A hand-made encoding folder of the phantom cohort (what `encode --reconstruct` writes, minus volumes)."""
    ids = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())
    out = tmp_path_factory.mktemp("encoding")
    (out / "encode.json").write_text(json.dumps({"patients": ids + ["not_in_cohort"],
                                                 "description": {"channels": ["window:soft_tissue", "mask:PTV", "dose"]}}))
    rows = []
    for index, pid in enumerate(ids):
        (out / pid / "recon").mkdir(parents=True)
        rows += [(pid, "window:soft_tissue", "psnr_body", 30.0 - index), (pid, "mask:PTV", "dice", 0.95 - 0.3 * index),
                 (pid, "dose", "D95_error_gy", 0.5 * index), (pid, "dose", "Dmean_error_gy", -0.2)]
    pd.DataFrame(rows, columns=["patient", "channel", "metric", "value"]).to_csv(out / "metrics.csv", index=False)
    return out


def test_catalog_serves_only_encoded_cohort_patients(encoding, phantom_cohort):
    catalog = Catalog(encoding, phantom_cohort)
    assert "not_in_cohort" not in catalog.ids and len(catalog.ids) == 4
    first = catalog.ids[0]
    assert catalog.check_id(first) == first
    assert catalog.files(first).recon == encoding / first / "recon"
    for bad in ["not_in_cohort", "../" + first, first + "/..", "..", f"{first}/ct.nrrd", "/etc/passwd",
                f"..\\{first}", "", None, 3, ["x"], first + "\x00"]:
        with pytest.raises(InputError):
            catalog.check_id(bad)
        with pytest.raises(InputError):
            catalog.files(bad)


def test_patient_list_flags_worst_first(encoding, phantom_cohort):
    catalog = Catalog(encoding, phantom_cohort)
    rows = catalog.patient_rows("flagged")
    flagged = [r["flagged"] for r in rows]
    assert flagged == sorted(flagged, reverse=True) and flagged[0]
    assert rows[0]["ptv_dice"] == min(r["ptv_dice"] for r in rows if r["flagged"])
    assert "PTV Dice" in rows[0]["why"]
    by_psnr = [r["psnr"] for r in catalog.patient_rows("psnr")]
    assert by_psnr == sorted(by_psnr)  # worst (lowest) first
    assert metrics_table(pd.DataFrame(columns=["patient", "channel", "metric", "value"])).empty


def test_verdicts_atomic_kept_and_checked(encoding, phantom_cohort):
    catalog = Catalog(encoding, phantom_cohort)
    pid = catalog.ids[1]
    store = VerdictStore(encoding, catalog.check_id)
    store.record(pid, "not acceptable", "=HYPERLINK(\"x\")\nPTV edge lost", "dr a")
    store.record(pid, "acceptable", "fine after all", "dr a")  # replaces dr a's verdict
    store.record(pid, "not acceptable", "", "dr b")
    again = VerdictStore(encoding, catalog.check_id)  # a restart reads the file back
    table = pd.read_csv(encoding / "review.csv", keep_default_na=False)
    assert list(table.columns) == ["patient", "verdict", "comment", "reviewer", "time"]
    assert len(again.rows) == 2 and again.latest()[pid]["reviewer"] == "dr b"
    assert set(table["verdict"]) == {"acceptable", "not acceptable"}
    for bad in ["../x", "not_in_cohort"]:
        with pytest.raises(InputError):
            store.record(bad, "acceptable")
    with pytest.raises(InputError):
        store.record(pid, "maybe")
    store.record(catalog.ids[2], "acceptable", "=1+1", "")
    assert VerdictStore(encoding, catalog.check_id).latest()[catalog.ids[2]]["comment"] == "'=1+1"
    assert not list(encoding.glob(".review.csv*"))  # no temporary left behind


def test_policy_requires_a_token_off_loopback():
    assert AccessPolicy.create().host == "127.0.0.1" and not AccessPolicy.create().requires_token
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("0.0.0.0")
    generated = AccessPolicy.create("0.0.0.0")
    assert generated.requires_token and generated.generated and len(generated.token) >= 30
    assert AccessPolicy.create("0.0.0.0").token != generated.token
    given = AccessPolicy.create("127.0.0.2", "s3cret-token-of-20ch")
    assert given.requires_token and given.url(8080).endswith("/index.html?token=s3cret-token-of-20ch")
    for bad in ["short", "has space in it 1234", "semi;colon-1234567890"]:
        with pytest.raises(InputError):
            AccessPolicy.create("0.0.0.0", bad)
    with pytest.raises(InputError):
        AccessPolicy.create("http://x/")


def _serve(policy: AccessPolicy):
    """An aiohttp app behind the gate, on a free port of policy.host, in a thread: (port, stop)."""
    from aiohttp import web

    async def page(request):
        return web.Response(text="PATIENT DATA")

    async def ws(request):
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        await socket_.send_str("PATIENT DATA")
        await socket_.close()
        return socket_

    loop = asyncio.new_event_loop()
    app = web.Application(middlewares=[make_middleware(policy)])
    app.router.add_get("/index.html", page)
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    with socket.socket() as probe:
        probe.bind((policy.host, 0))
        port = probe.getsockname()[1]
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, policy.host, port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return port, stop


def _get(url: str, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers


def test_gate_refuses_without_or_with_wrong_token():
    policy = AccessPolicy.create("127.0.0.2", "right-token-0123456789")
    port, stop = _serve(policy)
    base = f"http://127.0.0.2:{port}"
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    try:
        for url, headers in [(f"{base}/index.html", {}), (f"{base}/index.html?token=wrong-token-0123456789", {}),
                             (f"{base}/index.html", {"Authorization": "Bearer nope"}),
                             (f"{base}/index.html", {"Cookie": "deepdosimetrics_review_token=nope"}),
                             (f"{base}/ws", upgrade), (f"{base}/ws?token=wrong", upgrade)]:
            status, body, _ = _get(url, headers)
            assert status == 403 and "PATIENT" not in body, url
        status, body, headers = _get(f"{base}/index.html?token=right-token-0123456789")
        assert status == 200 and body == "PATIENT DATA"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert _get(f"{base}/index.html", {"Authorization": "Bearer right-token-0123456789"})[0] == 200
        assert _get(f"{base}/index.html", {"Cookie": "deepdosimetrics_review_token=right-token-0123456789"})[0] == 200
        # a page of another site may not open the websocket, even with the cookie
        cross = {**upgrade, "Origin": "http://evil.example", "Cookie": "deepdosimetrics_review_token=right-token-0123456789"}
        assert _get(f"{base}/ws", cross)[0] == 403
    finally:
        stop()


def test_gate_on_loopback_refuses_foreign_host_names():
    policy = AccessPolicy.create("127.0.0.1")
    port, stop = _serve(policy)
    try:
        assert _get(f"http://127.0.0.1:{port}/index.html")[0] == 200
        status, body, _ = _get(f"http://127.0.0.1:{port}/index.html", {"Host": f"rebind.example:{port}"})
        assert status == 403 and "PATIENT" not in body
    finally:
        stop()


def test_traversal_planes_first_equal_the_full_blend_on_the_planes():
    """The station decodes only the tiles crossing the displayed planes first: their blend on those planes
    must be what the whole-volume stitcher gives there (edges, overlaps, uncovered air included)."""
    from DeepDosimetricsLib.deep.tiling import ArraySink, SlabStitcher, TileGrid, gaussian_weights
    from DeepDosimetricsLib.review.traversal import blend_planes, plane_tiles

    rng = np.random.default_rng(3)
    shape = (21, 30, 26)
    grid = TileGrid.create(shape, 8, 0.25)
    positions = [p for p in grid.positions() if rng.random() > 0.2]  # some tiles skipped, as air
    values = {p: rng.random((8, 8, 8), dtype=np.float32) for p in positions}
    sink = ArraySink(shape, 1)
    stitcher = SlabStitcher(shape, 1, grid.tile, sink, fill=[0.25])
    for p in positions:
        stitcher.add(p, values[p][None])
    stitcher.finish()
    full = sink.array[0]
    weights = gaussian_weights(grid.tile)
    for planes in [(0, 0, 0), (20, 29, 25), (7, 13, None), (None, None, 11), (12, None, None)]:
        chosen = plane_tiles(positions, grid.tile, planes)
        assert len(chosen) < len(positions)
        got = blend_planes(shape, weights, [positions[i] for i in chosen], [values[positions[i]] for i in chosen],
                           planes, 0.25)
        assert sorted(got) == [a for a, p in enumerate(planes) if p is not None]
        for axis, (index, plane) in got.items():
            np.testing.assert_allclose(plane, np.take(full, index, axis=axis), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [dict(), dict(pca_start=True), dict(residual=True, decoder_convs=2)])
def test_decoded_channel_and_plane_slices_equal_the_model_decode(variant):
    """The station's decoder (one channel; only the slices crossing the planes) gives the model's values
    (in [0, 1]; summed in another order: equal to float32 rounding)."""
    import torch
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder
    from DeepDosimetricsLib.review.decode import decode_channel, decode_slices

    torch.manual_seed(1)
    config = ModelConfig(channels=["window:soft_tissue", "mask:PTV", "dose"], tile=16, features=4, widths=[4, 8],
                         groups=2, **variant)
    model = TileAutoencoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # the zero-started gains and biases too
        if config.pca_start:
            d = config.tile_values
            model.set_pca_basis(0.25 + 0.5 * torch.rand(d), 0.05 * torch.randn(d, 4), torch.ones(4))
    model.eval().to(memory_format=torch.channels_last_3d)
    z = torch.randn(5, 4)
    tiles, axes, offsets = [0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 0, 1, 2, 0], [0, 15, 7, 8, 1, 14, 9]
    with torch.inference_mode():
        full = model.decode(z)
        for channel in range(3):
            np.testing.assert_allclose(decode_channel(model, z, channel), full[:, channel], atol=1e-5)
            got = decode_slices(model, z, channel, tiles, axes, offsets)
            want = torch.stack([full[t, channel].select(a, o) for t, a, o in zip(tiles, axes, offsets)])
            np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module")
def traversal_setup(phantom_subset, tiny_model, tmp_path_factory):
    """A one-patient phantom encoding by the tiny model, its Traverser, and the reference whole-volume decode
    (``decode_tiles``: every channel, every tile, the encoder's SlabStitcher) of a shift in physical units."""
    from DeepDosimetricsLib.cli import main
    from DeepDosimetricsLib.review.catalog import Catalog
    from DeepDosimetricsLib.review.traversal import Traverser

    root = tmp_path_factory.mktemp("traversal")
    cohort, model, enc, cache = phantom_subset(root / "cohort", 1), tiny_model(root / "model"), root / "enc", root / "cache"
    assert main(["encode", "--model", str(model), "--cohort", str(cohort), "--out", str(enc), "--cache", str(cache),
                 "--reconstruct", "--quiet"]) == 0
    catalog = Catalog(enc, cohort)
    traverser = Traverser(model, catalog, cache, threads=1, preview_bfloat16=False)  # float32: exact on the planes

    def reference(patient: str, shifts: dict, label: str) -> np.ndarray:
        from DeepDosimetricsLib.deep.encode.encoder import decode_tiles
        from DeepDosimetricsLib.deep.tiling import ArraySink

        traverser.patient_shape(patient)
        sink = ArraySink(traverser.shape, len(traverser.labels))
        decode_tiles(traverser.runner, traverser.grid, traverser.positions, traverser._features(traverser.key(shifts)),
                     sink, traverser.fill)
        return traverser._units(label, sink.array[traverser.labels.index(label)])

    traverser.model_dir = model
    return catalog, traverser, reference


def _unit_range(traverser, label: str) -> float:
    """The physical range of the channel's [0, 1] (the decoder's float32 rounding is relative to it)."""
    ends = traverser._units(label, np.array([0.0, 1.0], np.float32))
    return float(abs(ends[1] - ends[0]))


def test_traversal_preview_then_exact_equal_the_full_stitcher(traversal_setup):
    """Preview (the displayed planes) first, then the exact whole volume: both equal to the full stitcher's."""
    from DeepDosimetricsLib.review.traversal import EXACT, PREVIEW, Updates

    catalog, traverser, reference = traversal_setup
    patient, label, shifts = catalog.ids[0], "window:soft_tissue", {"z00": 2.0, "z02": -1.5}
    want = reference(patient, shifts, label)
    scale = _unit_range(traverser, label)
    shape = traverser.patient_shape(patient)
    planes = (shape[0] // 2, shape[1] // 3, shape[2] - 1)
    updates = Updates(traverser)
    ticket, preview = updates.preview(patient, shifts, label, planes)
    assert preview.stage == PREVIEW and preview.full is None and 0 < preview.tiles < len(traverser.positions)
    for axis, (index, plane) in preview.planes.items():
        assert index == planes[axis]
        np.testing.assert_allclose(plane, np.take(want, index, axis=axis), atol=1e-5 * scale)
    exact = asyncio.run(updates.exact(ticket, patient, shifts, label))
    assert exact is not None and exact.volume.shape == shape
    np.testing.assert_allclose(exact.volume, want, atol=1e-5 * scale)
    assert np.abs(exact.volume - reference(patient, {}, label)).max() > 1e-3 * scale  # the shift shows
    again = traverser.planes(patient, shifts, label, planes)  # a small volume is kept: exact at once
    assert again.stage == EXACT and again.tiles == 0
    residual = traverser.full(patient, shifts, label, residual=True)
    np.testing.assert_allclose(residual.volume, want - traverser.truth(label), atol=1e-5 * scale)


def test_bfloat16_preview_is_close_and_labelled(traversal_setup):
    """Where the CPU runs bfloat16 natively the preview is decoded in it: labelled, close to the exact values."""
    from DeepDosimetricsLib.review.decode import native_bfloat16
    from DeepDosimetricsLib.review.traversal import Traverser

    catalog, exact, reference = traversal_setup
    assert not exact.preview_bfloat16 and exact.planes(catalog.ids[0], {"z01": 1.0}, "dose", (5, None, None)
                                                         ).precision == "float32"
    if not native_bfloat16():
        pytest.skip("this CPU has no native bfloat16 (the preview is float32 here)")
    traverser = Traverser(exact.model_dir, catalog, exact.cache.folder, threads=1)
    assert traverser.preview_bfloat16
    patient, label, shifts = catalog.ids[0], "window:soft_tissue", {"z03": -2.0}
    want = reference(patient, shifts, label)
    planes = (4, 17, 30)
    preview = traverser.planes(patient, shifts, label, planes)
    assert preview.precision == "bfloat16" and preview.full is None
    for axis, (index, plane) in preview.planes.items():
        np.testing.assert_allclose(plane, np.take(want, index, axis=axis), atol=2e-2 * _unit_range(traverser, label))


def test_a_move_supersedes_the_pending_exact_decode(traversal_setup, monkeypatch):
    """A slider move while the whole volume of the previous one is being decoded stops that decode between
    batches and drops it; the newer request's exact volume arrives."""
    import threading

    import DeepDosimetricsLib.review.decode as decode
    from DeepDosimetricsLib.review.traversal import BATCH, Updates

    catalog, traverser, reference = traversal_setup
    patient, label = catalog.ids[0], "dose"
    first, second = {"z01": 1.0}, {"z01": 1.5}
    original, started, moved, calls = decode.decode_channel, threading.Event(), threading.Event(), []

    def slow(model, z, channel):
        calls.append(len(z))
        started.set()
        assert moved.wait(30)  # the first batch waits until the slider has moved
        return original(model, z, channel)

    monkeypatch.setattr(decode, "decode_channel", slow)
    planes = (3, None, 20)
    updates = Updates(traverser)

    async def run():
        ticket_a, _ = updates.preview(patient, first, label, planes)
        pending = asyncio.ensure_future(updates.exact(ticket_a, patient, first, label))
        assert await asyncio.to_thread(started.wait, 30)
        ticket_b, preview = updates.preview(patient, second, label, planes)  # the move
        assert not updates.wanted(ticket_a) and updates.wanted(ticket_b)
        moved.set()
        assert await pending is None  # superseded: nothing to put in place
        stopped_after = len(calls)
        return stopped_after, preview, await updates.exact(ticket_b, patient, second, label)

    stopped_after, preview, exact = asyncio.run(run())
    batches = -(-len(traverser.positions) // BATCH)
    assert batches > 2 and stopped_after == 1  # the first request decoded one batch, not the volume
    want = reference(patient, second, label)
    scale = _unit_range(traverser, label)
    np.testing.assert_allclose(exact.volume, want, atol=1e-5 * scale)
    np.testing.assert_allclose(preview.planes[2][1], want[:, :, 20], atol=1e-5 * scale)
