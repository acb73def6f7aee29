"""initdoctor's TensorBoard tab: a backend of a few JSON routes and a plain ES-module frontend.

TensorBoard finds it through the `tensorboard_plugins` entry point. The frontend (static/) is
served from the package: no build step, nothing fetched from the network. It imports neither torch
nor the probe: it reads what the writers put into the event files (see metadata.py).
"""

from __future__ import annotations

import json
import math
from importlib import resources

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .metadata import DIAGNOSIS_TAG, PLUGIN_NAME

# The frontend's files and their content types; nothing else is served from static/.
STATIC = {"index.js": "text/javascript", "style.css": "text/css"}
# Ask the data provider for every stored step.
ALL_STEPS = 1_000_000
# How many sampled steps TensorBoard keeps per run (its default for a plugin's tensors is 10, too few
# for the layers x steps view); the latest is always kept. --samples_per_plugin initdoctor=N overrides.
# A diagnosis is 15-175 KB of JSON for 8-128 layers, so 1000 steps stay within a few hundred MB.
KEEP_STEPS = 1000
# What the layers x steps heatmap shows, by LayerStats key.
HISTORY_KEYS = ("signal", "grad_q", "saturated", "dead")


def _band() -> list[float]:
    from .. import thresholds as T

    return [T.TREND_WARN, 1 / T.TREND_WARN]


class InitDoctorLoader(base_plugin.TBLoader):
    """What the `tensorboard_plugins` entry point names: keeps more sampled steps, then loads the tab."""

    def fix_flags(self, flags) -> None:
        keep = getattr(flags, "samples_per_plugin", None)
        if isinstance(keep, dict):
            keep.setdefault(PLUGIN_NAME, KEEP_STEPS)

    def load(self, context: base_plugin.TBContext) -> InitDoctorPlugin:
        return InitDoctorPlugin(context)


def _fixes() -> dict[str, str]:
    """code -> the fix title of the code table, shown under each finding."""
    from ..codes import CODES

    return {code: c.fix_title for code, c in CODES.items()}


class InitDoctorPlugin(base_plugin.TBPlugin):
    """Serves the diagnoses written by `initdoctor.watch` and `initdoctor check --tensorboard`."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data = context.data_provider
        self._multiplexer = context.multiplexer

    def get_plugin_apps(self) -> dict:
        return {
            "/index.js": self._serve_static,
            "/style.css": self._serve_static,
            "/runs": self._serve_runs,
            "/diagnosis": self._serve_diagnosis,
            "/history": self._serve_history,
            "/explain": self._serve_explain,
        }

    def is_active(self) -> bool:
        # TensorBoard first lists the tab when any run holds data of `data_plugin_names()` (this
        # plugin's name); this answers the same question where only an event multiplexer is at hand.
        if self._multiplexer is None:
            return False
        return bool(self._multiplexer.PluginRunToTagToContent(PLUGIN_NAME))

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="initdoctor",
                                            disable_reload=False)

    # -- data --
    def _read(self, request, run: str | None = None) -> dict[str, list]:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        flt = provider.RunTagFilter(runs=[run] if run is not None else None, tags=[DIAGNOSIS_TAG])
        data = self._data.read_tensors(ctx, experiment_id=eid, plugin_name=PLUGIN_NAME,
                                       downsample=ALL_STEPS, run_tag_filter=flt)
        return {r: tags[DIAGNOSIS_TAG] for r, tags in data.items() if DIAGNOSIS_TAG in tags}

    @staticmethod
    def _decode(datum) -> dict:
        raw = datum.numpy.item()
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)

    def _run_data(self, request, run: str | None) -> list:
        if not run:
            raise errors.InvalidArgumentError("give ?run=NAME")
        data = self._read(request, run)
        if run not in data:
            raise errors.NotFoundError(f"no initdoctor data in run {run!r}")
        return data[run]

    # -- routes --
    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/", 1)[-1]
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return http_util.Respond(request, body, STATIC[name])

    @wrappers.Request.application
    def _serve_runs(self, request):
        """{run: {"steps": [...], "source": "watch"|"check", "role": ..., "target": ...}}, runs sorted."""
        out = {}
        for run, points in sorted(self._read(request).items(), key=lambda item: _run_order(item[0])):
            last = self._decode(points[-1])
            out[run] = {"steps": [p.step for p in points], "source": last.get("source"),
                        "role": last.get("role"), "target": last.get("target")}
        return http_util.Respond(request, {"runs": out, "band": _band(), "fixes": _fixes()}, "application/json")

    @wrappers.Request.application
    def _serve_diagnosis(self, request):
        """The diagnosis of ?run= at ?step= (the latest step when not given), as the writer stored it."""
        points = self._run_data(request, request.args.get("run"))
        step = request.args.get("step")
        if step is None:
            chosen = points[-1]
        else:
            try:
                step = int(step)
            except ValueError:
                raise errors.InvalidArgumentError(f"step={step!r} is not an integer") from None
            chosen = next((p for p in points if p.step == step), None)
            if chosen is None:
                raise errors.NotFoundError(f"run {request.args.get('run')!r} has no data at step {step}")
        raw = chosen.numpy.item()
        return http_util.Respond(request, raw if isinstance(raw, bytes) else raw.encode(), "application/json")

    @wrappers.Request.application
    def _serve_history(self, request):
        """Layers x steps for the heatmap: {"steps", "layers", "<key>": [[value per step] per layer]}."""
        points = self._run_data(request, request.args.get("run"))
        return http_util.Respond(request, history(self._decode(p) for p in points), "application/json")

    @wrappers.Request.application
    def _serve_explain(self, request):
        """{"code", "page"}: the rule's page, as `initdoctor explain CODE` prints it."""
        from ..codes import page

        code = request.args.get("code", "")
        try:
            text = page(code)
        except KeyError as e:
            raise errors.NotFoundError(str(e.args[0])) from None
        return http_util.Respond(request, {"code": code.upper(), "page": text}, "application/json")


def _run_order(run: str) -> tuple:
    # check --tensorboard's before run reads first, its after run next to it
    head, _, tail = run.rpartition("/")
    role = {"before": 0, "after": 1}.get(tail)
    return (run, 0) if role is None else (head, role)


def history(diagnoses) -> dict:
    """The per-layer series of several diagnoses; layers in first-seen execution order."""
    steps: list[int] = []
    rows: dict[str, dict[str, list]] = {}
    for j, d in enumerate(diagnoses):
        steps.append(d.get("step", j))
        ran = sorted((lay for lay in d.get("layers", []) if lay.get("index", -1) >= 0), key=lambda lay: lay["index"])
        for lay in ran:
            row = rows.setdefault(lay["name"], {k: [None] * j for k in HISTORY_KEYS})
            for k in HISTORY_KEYS:
                v = lay.get(k)
                row[k].append(v if isinstance(v, (int, float)) and math.isfinite(v) else None)
        for row in rows.values():
            for k in HISTORY_KEYS:
                row[k].extend([None] * (j + 1 - len(row[k])))
    out: dict = {"steps": steps, "layers": list(rows)}
    for k in HISTORY_KEYS:
        out[k] = [rows[name][k] for name in rows]
    return out
