"""Render animated 3D assets into 4D grid shards with Blender, as a Ray Data job.

    ray job submit --working-dir . -- python pipelines/render_objaverse.py --source objaverse --output /data/renders
    python pipelines/render_objaverse.py --preset demo --output outputs/render      # local Ray

Each asset is imported into a warm Blender (one child process per Ray actor),
every action (up to --max-actions) becomes one V x T grid sample, and the
samples go into WebDataset shards through pipelines/common (docs/data_format.md).
A per-asset timeout, crash isolation and resume come from rendering/worker.py
and pipelines/common/job.py.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from pipelines.common.config import (ConfigError, check_choices, check_same_content, doc, parse_config, preset_table, run_cli,
                                     write_resolved)
from pipelines.common.errors import UserError, require
from pipelines.common.inputs import list_files
from pipelines.common.errors import ItemError
from pipelines.common.job import JobSpec, exit_code, run_job
from pipelines.common.shards import Sample, bounded_key, filtered_reason, json_bytes, safe_key
from pipelines.objaverse_source import (ANIMATED_LIST, DEFAULT_BASE_URL, SPLITS, TEST_LIST, TRAINABLE_LICENSES,  # noqa: E402
                                        SourceError, ensure_asset, list_assets, read_uid_list, split_uids)
from pipelines.render_filters import FILTERS, describe_funnel, funnel, mark
from rendering.settings import MIN_THREADS, RenderSettings

ASSET_EXTENSIONS = (".glb", ".gltf", ".fbx", ".obj")


@dataclass
class RenderJobConfig(RenderSettings):
    """Options of the render job (every field is also a --flag): every render setting (``RenderSettings``,
    defined once in rendering/settings.py, listed first by --help), then the job's own."""

    source: str = doc("procedural", "where assets come from: objaverse | local | procedural (SOURCES)")
    input: str = doc("", "objaverse: a uid list (.txt/.json/.parquet with 'uid'; default: the shipped 15,081 "
                         "animated uids, pipelines/data/objaverse/), or 'annotations' for every object whose "
                         "annotation counts an animation; local: a directory, a glob, or a Parquet manifest with "
                         "a 'path' column; procedural: assets by kind, KIND[:SEED],... (e.g. rigid,flicker:3; the "
                         "seed defaults to --seed plus the position; empty: --count assets cycling the normal kinds)")
    split: Literal[SPLITS] = doc("train", "objaverse: train leaves SV4D's 20 test uids out; test renders exactly "
                                 "those (for evaluation); all renders the list as given")
    licenses: list[str] = doc(text="objaverse: licences to keep, from each object's annotation (CC slugs: cc0, by, "
                              "by-sa, by-nc, ...; 'any' keeps every object)",
                              factory=lambda: list(TRAINABLE_LICENSES))
    output: str = doc("outputs/render", "output directory (shards/, index.parquet, failures.parquet)")
    count: int = doc(3, "procedural: number of assets to generate (without --input)")
    limit: int = doc(0, "render at most this many assets (0 = all listed)")
    base_url: str = doc(DEFAULT_BASE_URL, "objaverse: root of the Objaverse 1.0 layout (hub or mirror)")
    cache_dir: str = doc("", "where downloaded/generated assets are cached (default: <tmp>/render-asset-cache)")
    download_retries: int = doc(4, "objaverse: retries per download (exponential backoff)")
    download_timeout_s: float = doc(60.0, "objaverse: socket timeout per download attempt")
    prefetch: int = doc(2, "objaverse: assets of a part downloaded ahead while Blender renders (0 = each just "
                        "before its render); at most this many downloads in flight per worker")
    resolution: int = doc(0, "shortcut for a square image: sets --height and --width to N (0 = use them)")
    timeout_s: float = doc(900.0, "per-asset limit (import + all renders); Blender is killed past it")
    concurrency: int = doc(1, "Ray actors (each runs one warm Blender)")
    cpus_per_worker: float = doc(2.0, "CPUs reserved per actor")
    items_per_part: int = doc(4, "assets per part (one shard per part)")
    retry_failed: bool = doc(False, "retry assets recorded as failed by an earlier run")
    ray_address: str = doc("", "Ray cluster address (default: RAY_ADDRESS or a private local Ray)")
    dry_run: bool = doc(False, "skip downloads and Blender; write tiny fake frames (tests listing, sharding, resume)")
    inject_faults: dict = doc(text="testing only: {item_id or uid: hang|crash} makes that asset's Blender hang or die",
                              factory=dict)
    # The filters (pipelines/render_filters.py). The defaults sit between what 126 normal procedural samples
    # (tiny, demo, proof and default sizes) and the assets built to trip each filter measured; docs/rendering.md,
    # "Filtering what renders badly", has the table.
    filters: list[str] = doc(text="filters that mark bad samples, applied in this order (the first that trips is "
                             "the recorded reason; marked samples are still written, the training loader skips "
                             "them): " + "; ".join(f"{k}: {f.about}" for k, f in FILTERS.items())
                             + ". Empty (--filters '') switches filtering off (FILTERS)",
                             factory=lambda: list(FILTERS))
    filter_frames: int = doc(8, "static, distorted: the front view's first N frames are compared (8: all of a "
                             "demo grid, half a default one; long enough that an animation easing in is not "
                             "taken for still)")
    filter_min_coverage: float = doc(0.002, "empty: a frame where the object covers less than this share of the "
                                     "image (mean alpha; ~74 px of 144x256). Normal procedural assets cover >= "
                                     "0.0145 in every frame, one shrunk to a speck 0.0000")
    filter_border_px: int = doc(1, "leaves_frame: width of the image's edge band checked for the object")
    filter_alpha: float = doc(0.1, "alpha (0..1) above which a pixel shows the object: in the edge band "
                              "(leaves_frame), and for the box the similarity is measured in")
    filter_static_similarity: float = doc(0.97, "static: every early frame more similar than this to the first "
                                          "(SSIM where the object is, 1 = identical). Normal procedural motion "
                                          "scores <= 0.79, a thin pole sliding along itself <= 0.95, an action "
                                          "that moves nothing visible >= 0.982 (1 spp), 1.0 (16 spp)")
    filter_distorted_similarity: float = doc(0.35, "distorted: consecutive early frames less similar than this on "
                                             "average. Normal fast procedural motion scores >= 0.47, a mesh torn "
                                             "apart every other frame 0.06-0.24")

    def __post_init__(self) -> None:
        # --resolution N is folded into height and width here (and reset), so everything downstream,
        # the resolved config.yaml included, sees one size; given with --height/--width, it wins.
        if self.resolution > 0:
            self.height = self.width = self.resolution
            self.resolution = 0

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)
        need(self.source in SOURCES, f"--source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        check_choices(self)  # engine, denoiser, lighting, split: the Literal fields (the parser checks them too)
        need(1 <= self.views <= 99, f"--views must be 1..99 (two-digit member names); got {self.views}")
        need(1 <= self.frames <= 99, f"--frames must be 1..99 (two-digit member names); got {self.frames}")
        need(8 <= self.height <= 8192 and 8 <= self.width <= 8192,
             f"--height and --width must be 8..8192 pixels; got {self.height}x{self.width}")
        need(self.resolution >= 0, f"--resolution must be > 0 (a square N x N) or 0; got {self.resolution}")
        need(self.samples >= 1, f"--samples must be >= 1; got {self.samples}")
        need(self.fps > 0, f"--fps must be > 0; got {self.fps}")
        need(1.0 <= self.fov < 179.0, f"--fov must be in [1, 179) degrees; got {self.fov}")
        need(-90.0 < self.elevation < 90.0, f"--elevation must be in (-90, 90) degrees; got {self.elevation}")
        need(0.0 < self.arc <= 360.0, f"--arc must be in (0, 360] degrees; got {self.arc}")
        need(self.distance >= 0.0, f"--distance must be >= 0 (0 = automatic); got {self.distance}")
        if self.distance > 0:
            from rendering.cameras import fit_distance
            closest = fit_distance(self.fov, self.width, self.height, margin=1.0)
            need(self.distance >= closest,
                 f"--distance {self.distance} is too close: the unit-radius object leaves a {self.fov} degree "
                 f"(vertical) view of a {self.width}x{self.height} frame below {closest:.2f}; use 0 for automatic")
        need(self.max_actions >= 1, f"--max-actions must be >= 1; got {self.max_actions}")
        need(self.timeout_s > 0, f"--timeout-s must be > 0; got {self.timeout_s}")
        need(self.prefetch >= 0, f"--prefetch must be 0 or more; got {self.prefetch}")
        need(self.concurrency >= 1, f"--concurrency must be >= 1; got {self.concurrency}")
        need(self.cpus_per_worker > 0, f"--cpus-per-worker must be > 0; got {self.cpus_per_worker}")
        need(self.items_per_part >= 1, f"--items-per-part must be >= 1; got {self.items_per_part}")
        need(self.count >= 0 and self.limit >= 0, "--count and --limit must be >= 0")
        need(self.download_retries >= 0, "--download-retries must be >= 0")
        need(self.threads == 0 or self.threads >= MIN_THREADS,
             f"--threads must be 0 (the actor's CPUs) or >= {MIN_THREADS}; got {self.threads} (one Cycles thread "
             "keeps a second core spinning at 100%, so it costs two cores for one's work)")
        need(0 <= self.png_compression <= 100, f"--png-compression must be 0..100; got {self.png_compression}")
        for k, v in self.inject_faults.items():
            need(v in ("hang", "crash"), f"inject_faults[{k}] must be hang or crash; got {v!r}")
        need(list(self.filters) == [f for f in FILTERS if f in self.filters],
             f"--filters must name filters of {', '.join(FILTERS)}, each once and in that order (FILTERS); got "
             f"{','.join(self.filters) or 'none'}")
        need(self.filter_frames >= 2, f"--filter-frames must be >= 2 (a frame is compared with others); got "
                                      f"{self.filter_frames}")
        need(self.filter_border_px >= 1, f"--filter-border-px must be >= 1; got {self.filter_border_px}")
        for name in ("filter_min_coverage", "filter_alpha", "filter_static_similarity", "filter_distorted_similarity"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, f"--{name.replace('_', '-')} must be in [0, 1]; got {value}")
        # alpha 1 would find no pixel above it: no object box (every sample "static"), no border ever touched
        need(self.filter_alpha < 1.0, f"--filter-alpha must be below 1; got {self.filter_alpha}")
        need(self.filter_distorted_similarity < self.filter_static_similarity,
             f"--filter-distorted-similarity ({self.filter_distorted_similarity}) must be below "
             f"--filter-static-similarity ({self.filter_static_similarity})")

    def blender_threads(self) -> int:
        """Cycles threads per actor: --threads, else the actor's CPU reservation (so several actors on a node do
        not oversubscribe it), and never one (MIN_THREADS: one keeps a second core spinning)."""
        return self.threads or max(MIN_THREADS, int(round(self.cpus_per_worker)))

    def render_settings(self) -> RenderSettings:
        """The render settings alone: what the Blender worker receives with every asset."""
        return RenderSettings(**{f.name: getattr(self, f.name) for f in fields(RenderSettings)})


CONTENT_OPTIONS = ("source", "split") + tuple(f.name for f in fields(RenderSettings)
                                             if f.name not in RenderSettings.SPEED_ONLY)
"""Options that shape a rendered sample: a re-run into an existing output must keep them (what it renders,
and how many workers, may change). The source and the split (train and test renders must not share an
output), then every RenderSettings field but the speed-only ones, by option name."""

FILTER_OPTIONS = tuple(f.name for f in fields(RenderJobConfig) if f.name.startswith("filter"))
"""Options that decide a sample's recorded filter reason: a re-run into an existing output must keep them too,
or the output would hold samples judged by two standards."""


PRESET_TABLE: dict[str, dict[str, Any]] = {
    # Tests: as small as still means something, still 9:16 so every test renders a non-square frame.
    "tiny": dict(source="procedural", count=2, max_actions=2, views=2, frames=2, height=18, width=32, samples=1,
                 denoise=False, items_per_part=2, timeout_s=120.0),
    # What `make demo` renders: about 20 s on 2 cores, at the base model's own 72x128.
    "demo": dict(source="procedural", count=3, max_actions=2, views=4, frames=8, height=72, width=128, samples=16,
                 items_per_part=2, timeout_s=300.0),
    # The GPU proof run (docs/results.md): procedural assets at the proof model's own 64x64, 8 views x 8 frames
    # (its 4D window); 8 frames rather than 16 so the shards travel to the GPU machine (64 MiB a call).
    "proof": dict(source="procedural", count=56, max_actions=2, views=8, frames=8, height=64, width=64, samples=16,
                  items_per_part=8, timeout_s=600.0),
    # One machine (the one beside the GPU of the `small` training presets): the paper's renders of the first
    # 2,000 uids of the shipped list, with CPU Cycles in 8 actors of 2 cores (a 16-core node).
    "small": dict(source="objaverse", limit=2000, views=8, frames=16, height=144, width=256, samples=16,
                  items_per_part=8, concurrency=8, cpus_per_worker=2.0),
    # The paper's setting, for a cluster. 144x256 rather than 288x512: the paper uses renders only to fine-tune
    # the 4D model's sync layers, which run at the base model's 72x128 (4.1); 2x that is anti-aliasing for the
    # loader's area resize, while 288x512 would cost 4x the path tracing for pixels averaged away. (Renders for
    # the x4 upsampler would need --height 288 --width 512.)
    "paper": dict(source="objaverse", views=8, frames=16, height=144, width=256, samples=16, items_per_part=8,
                  concurrency=16, cpus_per_worker=2.0),
}
"""The render presets (pipelines.common.config.PRESET_NAMES), as field overrides of RenderJobConfig. A run
without --preset gets RenderJobConfig's own defaults, which are no preset: 8 views x 16 frames at 144x256 (9:16),
16 spp, the measured 60-degree arc, 3 procedural assets."""

PRESETS: dict[str, Callable[[], RenderJobConfig]] = preset_table(RenderJobConfig, PRESET_TABLE)


# ---------------------------------------------------------------------------------------------- listing

def _local_items(spec: str, limit: int) -> list[dict[str, Any]]:
    files = list_files(spec, ASSET_EXTENSIONS, id_column="uid", what=".glb/.gltf/.fbx/.obj files")
    paths = [f.path for f in files]
    if all(f.given_id is not None for f in files):
        uids = [f.given_id for f in files]
    else:
        # File stems when they are unique, else paths relative to the common root.
        stems = [Path(x).stem for x in paths]
        unique = len(set(stems)) == len(stems)
        uids = [safe_key(s) if unique else safe_key(os.path.relpath(x, os.path.commonpath(paths)))
                for s, x in zip(stems, paths)]
    # The readable name (uid) plus the file's fingerprint is the item's identity: another file under the same
    # name (a second scene.gltf elsewhere) or a changed file is a new item, rendered rather than skipped as done.
    items = [{"item_id": f"{u}-{source_fingerprint(x)}", "uid": u, "path": os.path.abspath(x)}
             for u, x in zip(uids, paths)]
    return items[:limit] if limit else items


def replaced_items(output: str | Path, items: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Listed local assets whose name is already in ``output`` under another identity (another file of that
    name, or this file before it changed): new item id -> the earlier ids, whose samples stay in the output."""
    import re

    import pyarrow.parquet as pq
    earlier: dict[str, set[str]] = {}
    for name in ("index.parquet", "failures.parquet"):
        path = Path(output) / name
        if path.is_file():
            for old in pq.read_table(path, columns=["item_id"]).column("item_id").to_pylist():
                # a name plus a 10-digit fingerprint, or a bare name (outputs written before fingerprints)
                earlier.setdefault(re.sub(r"-[0-9a-f]{10}$", "", old), set()).add(old)
    out = {i["item_id"]: sorted(earlier.get(i["uid"], set()) - {i["item_id"]}) for i in items}
    return {k: v for k, v in out.items() if v}


def source_fingerprint(path: str) -> str:
    """10 hex digits naming a local asset file by its full path, size and modification time: what make and
    rsync compare. (Hashing every file's bytes would read the whole collection on the driver before the first
    render; a glTF's external buffers are not covered, touch the .gltf when they change.)"""
    import hashlib
    full = os.path.abspath(path)
    try:
        st = os.stat(full)
        sig = f"{full}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:  # a URL in a manifest, or a dry run's made-up paths: the path alone
        sig = path if "://" in path else full
    return hashlib.sha1(sig.encode()).hexdigest()[:10]


def _procedural_item(kind: str, seed: int) -> dict[str, Any]:
    from rendering.procedural import kind_for
    # The id names the asset's own seed and the kind derives from that seed, so proc-000007 is the same
    # asset whatever --seed started the list (held-out sets are rendered with other seeds). A kind asked for
    # by name that the seed would not give is named in the id too: one id, one asset.
    uid = f"proc-{seed:06d}" if kind == kind_for(seed) else f"proc-{kind}-{seed:06d}"
    return {"item_id": uid, "uid": uid, "kind": kind, "seed": seed}


def _list_procedural(cfg: RenderJobConfig, stats: dict[str, int]) -> list[dict[str, Any]]:
    from rendering.procedural import ALL_KINDS, kind_for
    if not cfg.input:
        n = cfg.limit and min(cfg.limit, cfg.count) or cfg.count
        return [_procedural_item(kind_for(cfg.seed + i), cfg.seed + i) for i in range(n)]
    items = []
    for i, entry in enumerate(e.strip() for e in cfg.input.split(",") if e.strip()):
        kind, _, seed = entry.partition(":")
        if kind not in ALL_KINDS or (seed and not seed.isdigit()):
            raise UserError(f"--input of --source procedural lists assets as KIND[:SEED],... with KIND one of "
                            f"{', '.join(ALL_KINDS)}; got {entry!r}")
        item = _procedural_item(kind, int(seed) if seed else cfg.seed + i)
        if any(other["item_id"] == item["item_id"] for other in items):  # one asset, one item id
            raise UserError(f"--input names the asset {entry!r} ({item['item_id']}) more than once; list each "
                            "KIND:SEED once")
        items.append(item)
    return items[:cfg.limit] if cfg.limit else items


def _list_local(cfg: RenderJobConfig, stats: dict[str, int]) -> list[dict[str, Any]]:
    if not cfg.input:
        raise UserError("--source local needs --input (a directory, a glob or a Parquet manifest)")
    return _local_items(cfg.input, cfg.limit)


def _list_objaverse(cfg: RenderJobConfig, stats: dict[str, int]) -> list[dict[str, Any]]:
    if cfg.input == "annotations":
        uids = None
    else:
        if cfg.input and not Path(cfg.input).is_file():
            raise UserError(f"UID list {cfg.input} does not exist; pass a .txt/.json/.parquet file to --input (or "
                            "'annotations'; leave it out for the shipped list)")
        # the test split takes SV4D's uids whole unless a list was given explicitly (6 of them are not in the
        # shipped training list)
        uids = read_uid_list(cfg.input) if cfg.input else None if cfg.split == "test" else read_uid_list(ANIMATED_LIST)
    uids, stats["dropped_test_split"] = split_uids(cfg.split, uids)
    licenses = None if [x.lower() for x in cfg.licenses] == ["any"] else cfg.licenses
    # listing every animated object by its annotations: the test split is dropped as it is met
    exclude = read_uid_list(TEST_LIST) if cfg.input == "annotations" and cfg.split == "train" else ()
    try:
        items = list_assets(cfg.base_url, _cache_dir(cfg) / "objaverse", uids=uids, limit=cfg.limit,
                            retries=cfg.download_retries, timeout=cfg.download_timeout_s, licenses=licenses,
                            exclude=exclude, stats=stats)
    except SourceError as exc:
        raise UserError(str(exc)) from None
    stats["dropped_test_split"] += stats.pop("dropped_excluded", 0)
    return items


def list_items(cfg: RenderJobConfig, stats: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The job's items; ``stats`` receives what the source's filters (e.g. objaverse's split, licence) dropped."""
    return SOURCES[cfg.source].list_items(cfg, stats if stats is not None else {})


def _cache_dir(cfg: RenderJobConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(tempfile.gettempdir()) / "render-asset-cache"


# ---------------------------------------------------------------------------------------------- processing

def to_samples(item_id: str, result: dict[str, Any]) -> list[Sample]:
    """Shard samples from a worker result; keys are ``<item id>__<action>``, made unique per asset."""
    out = []
    used: set[str] = set()
    for s in result["samples"]:
        meta, cams = s["meta"], s["cameras"]
        files = dict(s["files"])
        files["cameras.json"] = json_bytes(cams)
        meta["item_id"] = item_id  # the job's identity of the asset (local files: name and fingerprint)
        files["meta.json"] = json_bytes(meta)  # with its filter record (RenderProcessor), when filters ran
        key = bounded_key(f"{safe_key(item_id)}__{safe_key(s['action'])}")
        # "Take 1" and "Take_1" map to the same safe key; a repeated key would merge two samples.
        base, n = key, 1
        while key in used:
            key, n = f"{base}-{n}", n + 1
        used.add(key)
        out.append(Sample(key=key, item_id=item_id, files=files, kind="render", views=meta["views"],
                          frames=meta["frames"], height=meta["height"], width=meta["width"],
                          filtered=filtered_reason(meta)))
    return out


class RenderProcessor:
    """Per-actor: fetch an asset, render it in the warm Blender child, hand back samples."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = RenderJobConfig(**cfg)
        self.settings = self.cfg.render_settings()
        self.cache = _cache_dir(self.cfg)
        from rendering.worker import BlenderWorker
        self.worker = BlenderWorker(threads=self.cfg.blender_threads())
        self._pool: Any = None  # download threads, started by the first prefetch
        self._ahead: list[dict[str, Any]] = []  # the part's items not yet handed to the pool, in order
        self._fetching: dict[str, Any] = {}  # item id -> future of its verified path

    def prefetch(self, items: list[dict[str, Any]]) -> None:
        """A part's items, in the order they will be processed: their downloads start ahead of the renders
        (at most ``prefetch`` in flight or waiting), so the network works while Blender does."""
        if not SOURCES[self.cfg.source].remote or self.cfg.prefetch < 1:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=self.cfg.prefetch, thread_name_prefix="prefetch")
        self._ahead = list(items)
        self._top_up()

    def _top_up(self) -> None:
        while self._ahead and len(self._fetching) < self.cfg.prefetch:
            item = self._ahead.pop(0)
            self._fetching[item["item_id"]] = self._pool.submit(SOURCES[self.cfg.source].fetch, self, item)

    def _asset_path(self, item: dict[str, Any]) -> str:
        source = SOURCES[self.cfg.source]
        if not source.remote:
            return source.fetch(self, item)
        future = self._fetching.pop(item["item_id"], None)
        if self._pool is not None:
            self._ahead = [i for i in self._ahead if i["item_id"] != item["item_id"]]
            self._top_up()  # the next download starts before this render
        # the same retries, verification and cache as without prefetching, on another thread
        return future.result() if future is not None else source.fetch(self, item)

    def __call__(self, item: dict[str, Any]) -> list[Sample]:
        from rendering.worker import WorkerFailure
        path = self._asset_path(item)
        request = {"op": "render", "path": path, "uid": item["uid"], "source": self.cfg.source,
                   "settings": self.settings.to_dict()}
        fault = self.cfg.inject_faults.get(item["item_id"]) or self.cfg.inject_faults.get(item["uid"])
        if fault:
            request["fault"] = fault
        try:
            result = self.worker.call(request, timeout=self.cfg.timeout_s)
        except WorkerFailure as exc:
            raise ItemError(exc.stage, str(exc)) from None
        if "license" in item:  # what the annotation said: renders of CC-BY assets must credit them
            for s in result["samples"]:
                s["meta"]["license"] = item["license"]
        for s in result["samples"]:  # here, in the actor, from the frames it holds anyway (not in Blender)
            mark(s["meta"], s["files"], self.cfg)
        samples = to_samples(item["item_id"], result)
        marked = [f"{s.key.split('__', 1)[1]}: {s.filtered}" for s in samples if s.filtered]
        print(f"[render] {item['uid']}: {len(samples)} of {result['actions_total']} actions rendered, "
              f"{sum(s.views * s.frames for s in samples)} frames in {result['seconds']:.1f}s"
              + (f"; filtered {', '.join(marked)}" if marked else ""), flush=True)
        return samples

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _fetch_objaverse(proc: RenderProcessor, item: dict[str, Any]) -> str:
    cfg = proc.cfg
    # a failed download or verification raises AssetError, an ItemError: recorded as this item's failure
    return str(ensure_asset(item, cfg.base_url, proc.cache / "objaverse", retries=cfg.download_retries,
                            timeout=cfg.download_timeout_s))


def _fetch_procedural(proc: RenderProcessor, item: dict[str, Any]) -> str:
    from rendering.procedural import VERSION
    from rendering.worker import WorkerFailure
    cfg = proc.cfg
    path = proc.cache / "procedural" / f"{item['uid']}-{item['kind']}-a{max(2, cfg.max_actions)}-v{VERSION}.glb"
    if not path.exists():  # generated in the actor's warm Blender, then cached like a download
        try:
            proc.worker.call({"op": "procedural", "kind": item["kind"], "seed": item["seed"], "path": str(path),
                              "actions": max(2, cfg.max_actions)}, timeout=cfg.timeout_s)
        except WorkerFailure as exc:
            raise ItemError("generate", f"{exc.stage}: {exc}") from None
    return str(path)


@dataclass(frozen=True)
class AssetSource:
    """Where a render job's assets come from. Adding a source is one ``SOURCES`` entry (docs/extending.md):
    the render itself, sharding, resume and failure records are the same for every source."""

    list_items: Callable[[RenderJobConfig, dict[str, int]], list[dict[str, Any]]]
    """(config, stats) -> items, each with a unique ``item_id`` and a ``uid``; ``stats`` receives counts of
    what the source's filters left out (``dropped_<why>``), which the job summary reports."""
    fetch: Callable[[RenderProcessor, dict[str, Any]], str]
    """(processor, item) -> a local asset file Blender imports; a failure raises ``ItemError``."""
    remote: bool = False
    """fetch waits on the network: the next items are fetched on threads while Blender renders (--prefetch)."""


SOURCES: dict[str, AssetSource] = {
    "procedural": AssetSource(_list_procedural, _fetch_procedural),
    "local": AssetSource(_list_local, lambda proc, item: item["path"]),
    "objaverse": AssetSource(_list_objaverse, _fetch_objaverse, remote=True),
}
"""Every asset source by name (--source)."""


_FAKE_PNG: bytes | None = None


def _fake_png() -> bytes:
    global _FAKE_PNG
    if _FAKE_PNG is None:
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGBA", (8, 8), (128, 64, 32, 255)).save(buf, format="PNG")
        _FAKE_PNG = buf.getvalue()
    return _FAKE_PNG


class DryRunProcessor:
    """Everything but downloads and Blender: 8x8 frames, real cameras.json and meta.json."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = RenderJobConfig(**cfg)
        self.settings = self.cfg.render_settings()

    def __call__(self, item: dict[str, Any]) -> list[Sample]:
        from rendering.cameras import CircleRig, cameras_json, fit_distance, start_azimuth
        s = self.settings
        # Cameras of the 8x8 stand-in frames, so cameras.json, meta and the PNGs agree.
        rig = CircleRig(s.views, s.elevation, s.distance or fit_distance(s.fov, 8, 8), s.fov,
                        start_azimuth(item["uid"], s.seed, s.random_azimuth), s.arc)
        frames = {f"v{v:02d}t{t:02d}.png": _fake_png() for v in range(s.views) for t in range(s.frames)}
        meta = {"kind": "render", "item_id": item["item_id"], "uid": item["uid"], "source": self.cfg.source,
                "action": "dry_run", "views": s.views, "frames": s.frames, "height": 8, "width": 8, "fps": s.fps,
                "frame_indices": list(range(s.frames)), "normalization": {"center": [0, 0, 0], "scale": 1.0},
                "render": {"engine": "dry-run"}, "dry_run": True}
        return to_samples(item["item_id"], {"samples": [{"action": "dry_run", "files": frames,
                                                     "cameras": cameras_json(rig, 8, 8), "meta": meta}]})


def make_processor(cfg: dict[str, Any]):
    """Built once per Ray actor (module-level so the partial pickles)."""
    return DryRunProcessor(cfg) if cfg.get("dry_run") else RenderProcessor(cfg)


# ---------------------------------------------------------------------------------------------- entry point

def build_spec(cfg: RenderJobConfig) -> JobSpec:
    if not cfg.dry_run:
        require("bpy")
        if cfg.engine == "eevee" and not _has_gpu_hint():
            print("[render] warning: --engine eevee without a GPU falls back to software GL (~50 s a frame); "
                  "use --engine cycles on CPU nodes", file=sys.stderr, flush=True)
    if (cfg.depth or cfg.normals) and cfg.engine == "eevee":
        raise UserError("--depth/--normals are rendered with Cycles; use --engine cycles or cycles-gpu")
    listing: dict[str, int] = {}
    items = list_items(cfg, listing)
    if not items:
        why = f" (dropped: {listing})" if any(listing.values()) else ""
        raise UserError(f"source {cfg.source} listed no assets{why}; check --input/--split/--licenses/--count/--limit")
    if any(listing.values()):
        print(f"[render] listed {len(items)} assets; left out: " +
              ", ".join(f"{n} by {k.removeprefix('dropped_').replace('_', ' ')}" for k, n in listing.items()),
              flush=True)
    replaced = replaced_items(cfg.output, items) if cfg.source == "local" else {}
    if replaced:  # re-done, as asked, but not silently: the earlier renders are still in the output
        new, old = next(iter(replaced.items()))
        print(f"[render] warning: {len(replaced)} listed assets replace earlier ones of the same name in this output "
              f"(another file, or the file changed; e.g. {new} replaces {', '.join(old)}): they are rendered again "
              "and the earlier samples stay in index.parquet and the shards; render into a new --output to keep "
              "only the current files", file=sys.stderr, flush=True)
    if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        # A private local Ray has os.cpu_count() CPUs: asking an actor for more would never schedule.
        cfg = replace(cfg, cpus_per_worker=min(cfg.cpus_per_worker, float(os.cpu_count() or 1)))
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    return JobSpec(name="render", output=Path(cfg.output), items=items,
                   make_processor=partial(make_processor, values), items_per_part=cfg.items_per_part,
                   concurrency=cfg.concurrency, num_cpus=cfg.cpus_per_worker, retry_failed=cfg.retry_failed,
                   ray_address=cfg.ray_address,
                   # each filter step's entering, dropped and share, over the whole output (resumed runs too)
                   index_summary=partial(_filter_summary, order=() if cfg.dry_run else tuple(cfg.filters)),
                   extra_summary={"source": cfg.source, **listing, "items_replacing_earlier": len(replaced), "views": cfg.views, "frames": cfg.frames,
                                  "height": cfg.height, "width": cfg.width, "arc": cfg.arc, "engine": cfg.engine,
                                  "dry_run": cfg.dry_run})


def _filter_summary(index: Any, order: tuple[str, ...]) -> dict[str, Any]:
    return {"filters": funnel(index.column("filtered").to_pylist(), order)}


def _has_gpu_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(RenderJobConfig, PRESETS, argv, description=__doc__.splitlines()[0],
                          default_preset=None)  # a plain run: RenderJobConfig's defaults (PRESET_TABLE)
    spec = build_spec(cfg)  # every listing/option error surfaces here, before Ray starts
    # new rows beside old ones of other settings, or judged by other filter options: refused
    # (an output from before the filters existed was not judged: filters [] there)
    check_same_content(cfg, cfg.output, CONTENT_OPTIONS + FILTER_OPTIONS, absent={"filters": []})
    write_resolved(cfg, cfg.output)
    summary = run_job(spec)
    if cfg.filters and not cfg.dry_run:
        print(f"[render] filters over the output's {summary['samples_total']} samples: "
              f"{describe_funnel(summary['filters'])} (summary.json: filters)", flush=True)
    return exit_code(summary)


if __name__ == "__main__":
    run_cli(main)
