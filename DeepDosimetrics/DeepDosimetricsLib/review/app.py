"""The review station: a trame application on trame-slicer (Slicer's displayable managers, rendered offscreen).

The page: the patient list (flagged worst first, sortable), three linked slice views and a 3D view of the
structures as surfaces (or the original and the reconstruction side by side), the foreground controls (reconstruction / residual, opacity), the dose wash,
structure outlines, window/level presets, the DVH and metrics of the patient, the outcome-analysis summary,
the latent traversal sliders (with ``--model``) and the verdict form. Every value the browser sends is checked
here: patient ids by the catalog, numbers clamped, choices matched against fixed lists.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from typing import Any, Dict, List

from DeepDosimetricsLib.review.catalog import Catalog
from DeepDosimetricsLib.review.scene import WL_PRESETS, SceneBuilder, set_layers, show_surfaces
from DeepDosimetricsLib.review.security import AccessPolicy, install
from DeepDosimetricsLib.review.verdicts import VERDICTS, VerdictStore
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError
from DeepDosimetricsLib.runtime.memory import keep_heap, release_memory

log = logging.getLogger(__name__)
FOREGROUND_MODES = ("reconstruction", "residual")
SORT_KEYS = ("flagged", "psnr", "ptv_dice", "d95_error_gy", "dmean_error_gy", "mae_hu_body", "patient")
MAIN_LAYOUT, SIDE_LAYOUT = "review", "side by side"
THREED = "ThreeD"
#: seconds between the slice images of a new patient and building its structure surfaces for the 3D view
SURFACE_DELAY_S = 1.0
#: seconds between a traversal's planes and the start of its whole-volume decode in the background
BACKGROUND_DELAY_S = 0.3
SELECT_STYLE = "border:1px solid #888; border-radius:3px; padding:1px 4px; appearance:auto"


def _number(value: Any, low: float, high: float, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    if math.isnan(number):
        return default
    return min(max(number, low), high)


def _no_view_ui(*_args, **_kwargs) -> None:
    """No per-view gutter: the page's own controls drive the views."""


class ReviewApp:
    """Builds the trame server, the slicer scene and the page; ``start`` serves it."""

    def __init__(self, catalog: Catalog, verdicts: VerdictStore, policy: AccessPolicy, traverser=None,
                 server=None):
        for noisy in ("trame_server", "trame_client", "trame_slicer", "trame_rca", "wslink", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.catalog = catalog
        self.verdicts = verdicts
        self.policy = policy
        self.traverser = traverser
        keep_heap()
        self.server = server or get_server("deepdosimetrics_review", client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        install(self.server, policy)
        self.slicer = SlicerApp()
        # interactive quality = still quality (90): trame-rca then renders and encodes each update once, not
        # an interactive frame followed by a still one (two software-GL renders per view per change)
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=_no_view_ui,
                               three_d_view_ui_f=_no_view_ui, target_fps=10.0, blur_fps=5.0,
                               interactive_quality=90)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        axial, coronal, sagittal = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                                    ViewLayoutDefinition.sagittal_view())
        # the 3D view: structure surfaces on a uniform background (a blank view is then recognisable)
        threed = ViewLayoutDefinition.threed_view(name=THREED, background_color="#000000")
        original = ViewLayoutDefinition.slice_view("Axial", label="Original", color="#8888FF")
        # Slicer's "four-up": axial | 3D above, coronal | sagittal below
        self.layouts.register_layout(MAIN_LAYOUT, Layout(LayoutDirection.Vertical, [
            Layout(LayoutDirection.Horizontal, [axial, threed]),
            Layout(LayoutDirection.Horizontal, [coronal, sagittal])]))
        self.layouts.register_layout(SIDE_LAYOUT, Layout(LayoutDirection.Horizontal, [original, axial]),
                                     lazy_initialization=True)
        self.layouts.set_layout(MAIN_LAYOUT)
        self.builder = SceneBuilder(self.slicer.scene, catalog)
        self._dvh_curves: Dict[str, Any] = {}
        self._traversal_node = None
        self._traversal_request = None
        self._updates = None  # review.traversal.Updates: preview then exact; a newer request supersedes
        if traverser is not None:
            from DeepDosimetricsLib.review.traversal import Updates

            self._updates = Updates(traverser)
        self._setup_crosshair()
        self._init_state()
        self._build_ui()
        self._bind()

    # ------------------------------------------------------------------ state
    @property
    def state(self):
        return self.server.state

    def _init_state(self) -> None:
        s = self.state
        s.sort_by = "flagged"
        s.patient_rows = self._rows("flagged")
        s.patient = ""
        channels = self.catalog.channels or ["window:soft_tissue"]
        s.channels = channels
        s.channel = next((c for c in channels if c.startswith("window")), channels[0])
        s.fg_mode = "reconstruction"
        s.opacity = 0.5
        s.show_dose = True
        s.presets = list(WL_PRESETS)
        s.preset = "soft tissue"
        s.side_by_side = False
        s.structures_all = []
        s.structures_shown = []
        s.dvh_png = ""
        s.patient_metrics = []
        s.summary_rows = self.catalog.summary_rows()
        s.summary_columns = list(self.catalog.summary.columns) if self.catalog.summary is not None else []
        s.prediction = ""
        s.features = list(self.traverser.names) if self.traverser is not None else []
        for name in s.features:
            s[name] = 0.0
        s.traversal_message = "" if self.traverser is not None else "start with --model MODEL_DIR for traversal"
        s.traversal_ms = 0
        s.traversal_stage = ""  # "preview": only the displayed planes are decoded yet; "exact": the whole volume
        s.surfaces = ""
        s.verdict = ""
        s.comment = ""
        s.reviewer = ""
        s.verdict_message = ""
        s.error = ""
        s.busy = False
        s.render_count = 0

    def _rows(self, sort_by: str) -> List[dict]:
        latest = self.verdicts.latest()
        rows = self.catalog.patient_rows(sort_by if sort_by != "patient" else "none")
        if sort_by == "patient":
            rows.sort(key=lambda r: r["patient"])
        for row in rows:
            verdict = latest.get(row["patient"])
            row["verdict"] = verdict["verdict"] if verdict else ""
            row["label"] = (("! " if row["flagged"] else "") + row["patient"]
                            + (f"  [{row['verdict']}]" if row["verdict"] else ""))
        return rows

    # ------------------------------------------------------------------ views
    def slice_views(self):
        return [v for v in self.slicer.view_manager.get_slice_views()
                if v.get_singleton_tag() in self.slicer.view_manager.get_current_view_ids()]

    def threed_views(self):
        return [v for v in self.slicer.view_manager.get_threed_views()
                if v.get_singleton_tag() in self.slicer.view_manager.get_current_view_ids()]

    def _view(self, tag: str):
        return self.slicer.view_manager.get_view(tag)

    def _setup_crosshair(self) -> None:
        import slicer

        crosshair = self.slicer.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowBasic)
            crosshair.SetCrosshairBehavior(slicer.vtkMRMLCrosshairNode.OffsetJumpSlice)
        self._crosshair = crosshair

    def _link_views(self) -> None:
        scene = self.slicer.scene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode").SetLinkedControl(True)

    def refresh_layers(self) -> None:
        """Put the current patient's nodes into every slice view of the current layout."""
        current = self.builder.current
        if current is None:
            return
        s = self.state
        foreground = self._foreground()
        opacity = _number(s.opacity, 0.0, 1.0, 0.5)
        for view in self.slice_views():
            tag = view.get_singleton_tag()
            if tag == "Original":
                original = self._original_node()
                window = s.channel.startswith("window")
                set_layers(self.slicer.scene, view, original if window else current.ct,
                           None if window else original, 1.0 if not window else 0.0, current.dose,
                           bool(s.show_dose) and not s.channel.startswith("dose"))
            elif s.side_by_side and s.channel.startswith("window") and s.fg_mode == "reconstruction":
                set_layers(self.slicer.scene, view, foreground or current.ct, None, 0.0, current.dose,
                           bool(s.show_dose))
            else:
                set_layers(self.slicer.scene, view, current.ct, foreground, opacity, current.dose,
                           bool(s.show_dose) and not (s.channel.startswith("dose") and opacity > 0.5))
        s.render_count = int(s.render_count or 0) + 1

    def _original_node(self):
        current = self.builder.current
        if self.state.channel.startswith("dose"):
            return current.dose
        return current.ct if self.state.channel.startswith("window") else None

    def _shifts(self) -> Dict[str, float]:
        if self.traverser is None:
            return {}
        return {name: _number(self.state[name], -3.0, 3.0, 0.0) for name in self.traverser.names
                if abs(_number(self.state[name], -3.0, 3.0, 0.0)) > 1e-9}

    def _foreground(self):
        """The foreground node: the file reconstruction/residual, or the traversal result when shifted.

        A traversal decodes the displayed planes first (the views update from them: ``traversal_stage``
        "preview"), then the whole volume in the background (:meth:`_complete_traversal`), which replaces the
        node's voxels if still wanted (``traversal_stage`` "exact").
        """
        from DeepDosimetricsLib.review.traversal import put_planes, traversal_node

        s = self.state
        current = self.builder.current
        mode = s.fg_mode if s.fg_mode in FOREGROUND_MODES else "reconstruction"
        shifts = self._shifts()
        if not shifts or s.channel not in getattr(self.traverser, "labels", []):
            self._supersede()  # any background decode is no longer wanted
            self._traversal_node, self._traversal_request = None, None
            s.traversal_stage = ""
            return self.builder.foreground(s.channel, mode)
        residual = mode == "residual"
        key = ("traversal", s.channel, mode)
        reuse = self._traversal_node if current.foreground_key == key else None
        request = (current.patient, self.traverser.key(shifts), s.channel, mode)
        if reuse is not None and reuse.GetScene() is not None and self._traversal_request == request:
            return reuse  # e.g. the opacity moved: nothing to decode
        self._traversal_request = request
        started = time.perf_counter()
        traverser = self.traverser
        node = traversal_node(self.slicer.scene, f"{current.patient} {s.channel} traversal",
                              traverser.patient_shape(current.patient), traverser.geometry,
                              fill=0.0 if residual else traverser.fill_units(s.channel), existing=reuse)
        # supersedes the background decode of an earlier request
        marks = [("node", time.perf_counter())]
        ticket, result = self._updates.preview(current.patient, shifts, s.channel, self._display_planes(node),
                                               residual)
        marks.append(("planes", time.perf_counter()))
        put_planes(node, result)
        marks.append(("put", time.perf_counter()))
        if reuse is None:
            limit = None
            if residual:
                import numpy as np

                values = np.concatenate([plane.ravel() for _, plane in result.planes.values()] or [np.zeros(1)])
                limit = float(np.percentile(np.abs(values), 99)) or 1.0
            self.builder.style_foreground(node, s.channel, mode, limit)
        marks.append(("style", time.perf_counter()))
        self.builder.replace_foreground(node, key, later=self._later)
        self._traversal_node = node
        s.traversal_ms = int(round(1000 * (time.perf_counter() - started)))
        marks.append(("shown", time.perf_counter()))
        log.debug("traversal update: %s", ", ".join(f"{name} {1000 * (t - before):.0f} ms" for (name, t), before
                                                     in zip(marks, [started] + [t for _, t in marks])))
        text = ", ".join(f"{k} {v:+.1f} SD" for k, v in sorted(shifts.items()))
        s.traversal_stage = result.stage
        if result.full is not None:
            s.traversal_message = f"{text}: decoded in {s.traversal_ms} ms (kept, exact)"
        else:
            s.traversal_message = (f"{text}: decoded in {s.traversal_ms} ms (preview: the displayed planes, from "
                                   f"the {result.tiles} tiles crossing them, in {result.precision}; whole volume "
                                   "following)")
            self._complete_traversal(ticket, current.patient, shifts, s.channel, residual, node, text)
        return node

    @staticmethod
    def _later(work) -> None:
        """Run ``work`` once the frames of this update went out (at once without an event loop)."""
        try:
            asyncio.get_running_loop().call_later(BACKGROUND_DELAY_S, work)
        except RuntimeError:  # no event loop (scripts)
            work()

    def _supersede(self) -> None:
        if self._updates is not None:
            self._updates.supersede()

    def _display_planes(self, node):
        """(z, y, x) indices on ``node``'s grid of the planes the slice views show (None where none does)."""
        import numpy as np
        import vtk

        ras_to_ijk = vtk.vtkMatrix4x4()
        node.GetRASToIJKMatrix(ras_to_ijk)
        matrix = np.array([[ras_to_ijk.GetElement(r, c) for c in range(4)] for r in range(4)])
        planes = [None, None, None]
        for view in self.slice_views():
            slice_to_ras = view.get_view_node().GetSliceToRAS()
            m = np.array([[slice_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
            normal = matrix[:3, :3] @ m[:3, 2]
            ijk = matrix @ m[:, 3]
            axis = int(np.argmax(np.abs(normal)))  # i (x), j (y) or k (z)
            planes[2 - axis] = int(round(float(ijk[axis])))
        return tuple(planes)

    def _complete_traversal(self, ticket, patient, shifts, channel, residual, node, text) -> None:
        """Decode the whole volume in a worker thread; put it into ``node`` unless a newer request came."""
        from DeepDosimetricsLib.review.traversal import EXACT, put_volume

        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop (scripts): the planes are what was asked for
            return

        async def finish():
            try:
                result = await self._updates.exact(ticket, patient, shifts, channel, residual,
                                                   delay=BACKGROUND_DELAY_S)  # the planes' frames go out first
            except Exception:  # noqa: BLE001 - logged; the planes stay on show
                log.exception("background traversal decode")
                return
            if result is None or self._traversal_node is not node or node.GetScene() is None:
                return  # superseded
            put_volume(node, result.volume)
            seconds = result.seconds
            del result
            release_memory()
            for view in self.slice_views():
                view.schedule_render()
            with self.state:
                self.state.traversal_stage = EXACT
                self.state.traversal_message = (f"{text}: decoded in {self.state.traversal_ms} ms, whole volume "
                                                f"in {1000 * seconds:.0f} ms more (exact)")

        asyncio.ensure_future(finish())

    # ------------------------------------------------------------------ actions
    def select_patient(self, patient: Any) -> None:
        s = self.state
        try:
            pid = self.catalog.check_id(patient)
        except DeepDosimetricsError as error:
            s.error = str(error)
            return
        s.error = ""
        s.busy = True
        try:
            if self.traverser is not None:
                for name in self.traverser.names:
                    s[name] = 0.0
            self._traversal_node, self._traversal_request = None, None
            self._supersede()
            current = self.builder.load(pid)
            release_memory()
            if self.traverser is not None:
                self.traverser.warm_up()  # the decoder's working memory faulted in again after the release
            s.structures_all = list(current.structures)
            s.structures_shown = [n for n in current.structures if n.upper().startswith("PTV")][:1] or \
                list(current.structures[:3])
            self.builder.set_structures_visible(s.structures_shown)
            self._metrics(pid)
            s.dvh_png = ""
            self.refresh_layers()
            self._centre_views()
            self._schedule_surfaces(current)
            mine = self.verdicts.latest().get(pid)
            s.verdict = mine["verdict"] if mine else ""
            s.comment = mine["comment"] if mine else ""
            s.verdict_message = f"verdict on file: {mine['verdict']} ({mine['time']})" if mine else ""
        except DeepDosimetricsError as error:
            s.error = f"{pid}: {error}"
        except Exception as error:  # noqa: BLE001 - shown on the page and logged, the server stays up
            log.exception("loading patient %s", pid)
            s.error = f"{pid}: could not be shown ({type(error).__name__})"
        finally:
            s.busy = False

    def _schedule_surfaces(self, current) -> None:
        """The DVH, then the 3D view's structure surfaces, just after the slice images of ``current`` went out."""
        self.state.surfaces = "building 3D surfaces..." if current.surfaces is not None else ""

        def build():
            if self.builder.current is not current:
                return
            with self.state:
                self._dvh(current.patient)
            if current.surfaces is None:
                return
            started = time.perf_counter()
            try:
                show_surfaces(current.surfaces)
                for view in self.threed_views():
                    view.reset_focal_point()
                    view.reset_camera()
                    view.schedule_render()
                message = f"3D surfaces in {time.perf_counter() - started:.1f} s"
            except Exception as error:  # noqa: BLE001 - the slice views stay usable without the 3D view
                log.exception("3D surfaces of %s", current.patient)
                message = f"no 3D surfaces ({type(error).__name__})"
            release_memory()
            with self.state:
                self.state.surfaces = message

        try:
            asyncio.get_running_loop().call_later(SURFACE_DELAY_S, build)
        except RuntimeError:  # no event loop (scripts)
            build()

    def _centre_views(self) -> None:
        """Fit the views and put the cursor and the slices through the target's centre."""
        import numpy as np

        current = self.builder.current
        for view in self.slice_views():
            view.fit_view_to_content()
        ras = current.target_ras  # found while the PTV's mask was read into the scene
        if ras is None:
            return
        if self._crosshair is not None:
            self._crosshair.SetCrosshairRAS(*[float(v) for v in ras])
        for view in self.slice_views():
            orientation = view.get_orientation()
            value = {"Axial": ras[2], "Coronal": ras[1], "Sagittal": ras[0]}.get(orientation)
            if value is not None and np.isfinite(value):
                view.set_slice_value(float(value))

    def _metrics(self, pid: str) -> None:
        row = self.catalog.metrics.loc[pid]
        labels = {"psnr": "PSNR body (dB)", "ssim": "SSIM", "mae_hu_body": "HU MAE body",
                  "ptv_dice": "PTV Dice", "dose_mae_gy_ptv": "dose MAE in PTV (Gy)",
                  "d95_error_gy": "D95 error (Gy)", "dmean_error_gy": "Dmean error (Gy)"}
        items = []
        for key, label in labels.items():
            value = row.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                items.append({"name": label, "value": f"{value:.3g}"})
        if row.get("why"):
            items.append({"name": "flagged", "value": str(row["why"])})
        self.state.patient_metrics = items
        predictions = self.catalog.predictions
        self.state.prediction = (f"{float(predictions[pid]):.3f}" if predictions is not None and pid in predictions
                                 else "")

    def _dvh(self, pid: str) -> None:
        """The DVH from the scene's own nodes (dose, structure labelmaps) and the reconstructed dose file."""
        from DeepDosimetricsLib.review.dvh import dvh_png, scene_curves
        from DeepDosimetricsLib.review.scene import channel_stems

        files = self.catalog.files(pid)
        stem = next((c for c in self.catalog.channels if c.startswith("dose")), None)
        path = files.recon_volume(channel_stems(self.catalog)[stem]) if stem else None
        current = self.builder.current
        try:
            self._dvh_curves = scene_curves(current, path) if current is not None else {}
        except DeepDosimetricsError as error:
            self._dvh_curves = {}
            self.state.error = f"DVH: {error}"
        self.state.dvh_png = dvh_png(self._dvh_curves, list(self.state.structures_shown)) if self._dvh_curves else ""

    def record_verdict(self) -> None:
        s = self.state
        try:
            row = self.verdicts.record(s.patient, s.verdict, s.comment, s.reviewer)
        except DeepDosimetricsError as error:
            s.verdict_message = f"not saved: {error}"
            return
        s.verdict_message = f"saved: {row['patient']} {row['verdict']} ({row['time']})"
        s.patient_rows = self._rows(s.sort_by if s.sort_by in SORT_KEYS else "flagged")

    # ------------------------------------------------------------------ bindings
    def _bind(self) -> None:
        s = self.state

        @s.change("patient")
        def _patient(patient, **_):
            if patient:
                self.select_patient(patient)

        @s.change("sort_by")
        def _sort(sort_by, **_):
            s.patient_rows = self._rows(sort_by if sort_by in SORT_KEYS else "flagged")

        @s.change("channel", "fg_mode", "opacity", "show_dose")
        def _layers(channel, fg_mode, **_):
            if channel not in s.channels:
                s.channel = s.channels[0]
                return
            if fg_mode not in FOREGROUND_MODES:
                s.fg_mode = "reconstruction"
                return
            self.refresh_layers()

        @s.change("preset")
        def _preset(preset, **_):
            if preset in WL_PRESETS:
                self.builder.set_preset(preset)
                self.refresh_layers()

        @s.change("structures_shown")
        def _structures(structures_shown, **_):
            names = [n for n in (structures_shown or []) if n in (s.structures_all or [])]
            self.builder.set_structures_visible(names)
            if self._dvh_curves:
                from DeepDosimetricsLib.review.dvh import dvh_png

                s.dvh_png = dvh_png(self._dvh_curves, names)
            for view in self.slice_views():
                view.schedule_render()

        @s.change("side_by_side")
        def _side(side_by_side, **_):
            self.layouts.set_layout(SIDE_LAYOUT if side_by_side else MAIN_LAYOUT)
            self._link_views()
            self.refresh_layers()
            if self.builder.current is not None:
                self._centre_views()

        if self.traverser is not None:
            @s.change(*self.traverser.names)
            def _traverse(**_):
                if self.builder.current is not None:
                    try:
                        self.refresh_layers()
                    except DeepDosimetricsError as error:
                        s.traversal_message = f"traversal unavailable: {error}"

        self.server.controller.record_verdict = self.record_verdict

    # ------------------------------------------------------------------ page
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("DeepDosimetrics review station")
            with layout.toolbar:
                v3.VSpacer()
                html.Span("{{ error }}", id="error", style="color:#ff8a80; margin-right:1em")
                html.Span("loading...", v_show="busy", style="margin-right:1em")
                html.Span("{{ surfaces }}", id="surfaces", style="color:#aaa; margin-right:1em")
            with layout.drawer as drawer:
                drawer.width = 380
                with html.Div(style="padding:8px; font-size:13px"):
                    html.Div("Patients (! = flagged)", style="font-weight:bold")
                    with html.Div(style="display:flex; gap:6px; align-items:center"):
                        html.Label("sort")
                        with html.Select(v_model=("sort_by",), id="sort-by", style=SELECT_STYLE):
                            for key in SORT_KEYS:
                                html.Option(key, value=key)
                    with html.Select(v_model=("patient",), id="patient-select", size=6,
                                     style="width:100%; background:#222; color:#eee"):
                        html.Option("{{ p.label }}", v_for="p in patient_rows", key="p.patient",
                                    value=("p.patient",), title=("p.why",))
                    html.Div("Foreground", style="font-weight:bold; margin-top:8px")
                    with html.Div(style="display:flex; gap:6px; flex-wrap:wrap"):
                        with html.Select(v_model=("channel",), id="channel", style=SELECT_STYLE):
                            html.Option("{{ c }}", v_for="c in channels", key="c", value=("c",))
                        with html.Select(v_model=("fg_mode",), id="fg-mode", style=SELECT_STYLE):
                            for mode in FOREGROUND_MODES:
                                html.Option(mode, value=mode)
                    with html.Div():
                        html.Label("opacity {{ Number(opacity).toFixed(2) }}", **{"for": "opacity"})
                        html.Input(type="range", id="opacity", min=0, max=1, step=0.05,
                                   v_model_number=("opacity",), style="width:100%")
                    with html.Div(style="display:flex; gap:10px; align-items:center"):
                        html.Input(type="checkbox", id="show-dose", v_model=("show_dose",))
                        html.Label("dose wash", **{"for": "show-dose"})
                        html.Input(type="checkbox", id="side-by-side", v_model=("side_by_side",))
                        html.Label("original | reconstruction", **{"for": "side-by-side"})
                    with html.Div(style="display:flex; gap:6px; align-items:center"):
                        html.Label("W/L")
                        with html.Select(v_model=("preset",), id="preset", style=SELECT_STYLE):
                            html.Option("{{ w }}", v_for="w in presets", key="w", value=("w",))
                    html.Div("Structures (PTV always shown)", style="font-weight:bold; margin-top:8px")
                    with html.Div(style="display:flex; flex-wrap:wrap; gap:4px 10px"):
                        with html.Label(v_for="n in structures_all", key="n"):
                            html.Input(type="checkbox", value=("n",), v_model=("structures_shown",))
                            html.Span("{{ n }}")
                    html.Div("Latent traversal (SD)", style="font-weight:bold; margin-top:8px")
                    with html.Div(style="color:#aaa"):
                        # "preview": the displayed planes only, the rest of the volume follows; "exact": all of it
                        html.Span("{{ traversal_stage }}", id="traversal-stage", v_show="traversal_stage",
                                  style="border:1px solid #888; border-radius:3px; padding:0 4px; margin-right:4px")
                        html.Span("{{ traversal_message }}", id="traversal-message")
                    for name in self.state.features:
                        with html.Div(style="display:flex; gap:6px"):
                            html.Span(name, style="width:30px")
                            html.Input(type="range", id=f"slider-{name}", min=-3, max=3, step=0.5,
                                       v_model_number=(name,), style="flex:1")
                            html.Span(f"{{{{ Number({name}).toFixed(1) }}}}", style="width:30px")
                    html.Div("Verdict", style="font-weight:bold; margin-top:8px")
                    with html.Div(style="display:flex; gap:10px"):
                        for verdict in VERDICTS:
                            with html.Label():
                                html.Input(type="radio", name="verdict", value=verdict, v_model=("verdict",),
                                           id=f"verdict-{verdict.replace(' ', '-')}")
                                html.Span(verdict)
                    html.Textarea(v_model=("comment",), id="comment", placeholder="comment", rows=2,
                                  maxlength=2000, style="width:100%; background:#222; color:#eee")
                    html.Input(v_model=("reviewer",), id="reviewer", placeholder="reviewer", maxlength=80,
                               style="width:100%; background:#222; color:#eee")
                    html.Button("Save verdict", id="save-verdict", click=self.server.controller.record_verdict,
                                disabled=("!patient || !verdict",),
                                style="margin-top:4px; padding:2px 10px; background:#1565c0; color:white")
                    html.Div("{{ verdict_message }}", id="verdict-message", style="color:#9ccc65")
            with layout.content:
                with html.Div(style="display:flex; height:100%; width:100%"):
                    with html.Div(style="flex:3; height:100%; display:flex; min-width:0"):
                        self.layouts.initialize_layout_grid(layout)
                    with html.Div(style="flex:1; padding:8px; font-size:12px; overflow:auto; min-width:300px"):
                        html.Div("Patient {{ patient }}", style="font-weight:bold")
                        with html.Table(style="width:100%"):
                            with html.Tr(v_for="m in patient_metrics", key="m.name"):
                                html.Td("{{ m.name }}")
                                html.Td("{{ m.value }}", style="text-align:right")
                        html.Img(src=("dvh_png",), v_show="dvh_png", id="dvh", style="width:100%")
                        html.Div("predicted risk (out-of-fold mean): {{ prediction }}", v_show="prediction")
                        with html.Div(v_show="summary_rows.length"):
                            html.Div("Outcome analysis (predict summary)", style="font-weight:bold")
                            with html.Table(style="width:100%; font-size:11px"):
                                with html.Tr():
                                    html.Th("{{ c }}", v_for="c in summary_columns", key="c")
                                with html.Tr(v_for="(r, i) in summary_rows", key="i"):
                                    html.Td("{{ r[c] }}", v_for="c in summary_columns", key="c")
        self.ui = layout

    # ------------------------------------------------------------------ serving
    def start(self, port: int = 0, announce=print) -> None:
        """Serve (blocking). ``announce`` receives the line with the URL once the port is bound."""

        def ready(**_):
            announce(f"review station: {self.policy.url(self.server.port)}")
            sys.stdout.flush()

        self.server.controller.on_server_ready.add(ready)
        saved = sys.argv
        sys.argv = saved[:1]  # trame reads its own options from sys.argv: only ours apply
        try:
            self.server.start(port=port, host=self.policy.host, open_browser=False, show_connection_info=False,
                              timeout=0, disable_logging=True)
        finally:
            sys.argv = saved
