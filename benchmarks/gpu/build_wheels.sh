#!/usr/bin/env bash
# Rebuild .whl/ from scratch: the Python wheels that the lent GPU machine lacks to run
#   training/train_base.py, training/train_4d.py   (Ray Train + DeepSpeed, --mlflow-uri none)
#   pipelines/make_pseudo4d.py                       (Ray Data, procedural videos; but see README: av)
# on its image (Python 3.12, x86-64, torch/numpy/pandas/pyarrow/... already there, no network).
#
# Usage (repo root or anywhere):   benchmarks/gpu/build_wheels.sh
# Needs: network access to PyPI, ./.venv with torch (it builds the deepspeed wheel), zip-capable python.
# Env:   WHL_DIR      output folder        (default: <repo>/.whl, ignored by .gitignore)
#        MAX_MIB      size cap of WHL_DIR  (default: 52; the device call carries at most 64 MiB in all)
#        EXTRA_DEPS   more lock-pinned names to carry, space-separated (default: typing-extensions, 45 KB:
#                     pydantic's floor is newer than what the image's package list can vouch for)
#        IMAGE_LIST   file whose "Packages: a, b, ..." line lists the GPU image's Python packages
#                     (default: /work/.library/device/KINDS.md; the dependency scan is skipped if absent)
#
# Every version comes from cluster/constraints.txt (the project's lock), so a rebuild gives the same set.
# The ray wheel is repacked with fixed member order and timestamps, and the deepspeed wheel is built with
# a fixed SOURCE_DATE_EPOCH, so repeated builds on the same machine give byte-identical files (sha256 printed).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
WHL_DIR=${WHL_DIR:-$ROOT/.whl}
MAX_MIB=${MAX_MIB:-52}
IMAGE_LIST=${IMAGE_LIST:-/work/.library/device/KINDS.md}
CONSTRAINTS=$ROOT/cluster/constraints.txt
VENV_PY=$ROOT/.venv/bin/python
PIP=(python3 -m pip)            # any pip works for downloads: the target is given by the flags below
read -r -a EXTRA <<<"${EXTRA_DEPS-typing-extensions}"

# Target of every binary download: CPython 3.12, manylinux x86-64 (the GPU image). pip matches manylinux
# tags exactly, so name the ones these projects publish; pure-Python wheels (py3-none-any) match too.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# What ray's wheel carries that a headless Python job on one node never reads (prefixes of zip members):
#   ray/jars/                     ~32 MB: ray_dist.jar, only for Java workers (started only if `java` is
#                                 on PATH and the jar exists; runtime_env reads it only for Java jobs).
#   ray/dashboard/client/build/   ~2.5 MB: the dashboard web UI (JS bundles and source maps). The image
#                                 lacks ray[default]'s aiohttp_cors/opencensus/opentelemetry, so Ray starts
#                                 its dashboard in minimal mode, which serves no frontend at all.
# Everything else stays (ray/_private, ray/core binaries, ray/data, ray/train, ray/tune, ray/air, ray/util,
# ray/dashboard python modules, even rllib/serve/llm: ~2.6 MB that some lazy import might still reach).
RAY_DROP=("ray/jars/" "ray/dashboard/client/build/")

# Runtime needs missing from the GPU image (each found in a wheel's METADATA Requires-Dist, non-extra or
# from ray's data/train extras, and absent from the image's package list; the scan at the end re-checks):
#   jsonschema                       <- ray (core requirement; imported by `import ray`)
#   referencing, rpds-py,
#   jsonschema-specifications        <- jsonschema
#   pydantic                         <- ray[train] (Train v2 imports it) and deepspeed (its config classes)
#   pydantic-core, annotated-types,
#   typing-inspection                <- pydantic
#   tensorboardX                     <- ray[train] (Tune's TBX logger callback)
#   hjson                            <- deepspeed (imported by deepspeed.runtime.config)
# Already on the image (not carried): click filelock msgpack packaging protobuf pyyaml requests numpy pandas
# pyarrow fsspec attrs typing-extensions einops ninja psutil py-cpuinfo tqdm torch pillow transformers.
DEPS=(jsonschema referencing rpds-py jsonschema-specifications
      pydantic pydantic-core annotated-types typing-inspection
      tensorboardX hjson
      ${EXTRA[@]+"${EXTRA[@]}"})

log() { printf '[build_wheels] %s\n' "$*" >&2; }
# pip, minus the warnings this machine's pip.conf causes for its (absent) local extra indexes.
pip_quiet() { "${PIP[@]}" "$@" 2> >(sed '/neither a file nor a directory/d' >&2); }

# pin NAME -> the version cluster/constraints.txt pins for NAME (names compared PEP 503-normalized).
pin() {
    python3 - "$CONSTRAINTS" "$1" <<'EOF'
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
want = norm(sys.argv[2])
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if "==" in line and norm(line.split("==", 1)[0]) == want:
        print(line.split("==", 1)[1].strip()); break
else:
    sys.exit(f"{sys.argv[2]}: no '==' pin in {sys.argv[1]}")
EOF
}

[ -x "$VENV_PY" ] || { log "no $VENV_PY: run 'make install' first (deepspeed is built against its torch)"; exit 1; }
"$VENV_PY" -c 'import torch, setuptools, wheel' 2>/dev/null \
    || { log "$VENV_PY lacks torch/setuptools/wheel, which the deepspeed build needs"; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$WHL_DIR"
mkdir -p "$WHL_DIR"

# ---- 1. ray: download the cp312 manylinux wheel, repack it without RAY_DROP, fix its RECORD.
RAY_V=$(pin ray)
log "ray==$RAY_V: download"
pip_quiet download -q --no-deps "${TARGET[@]}" -d "$TMP/ray" "ray==$RAY_V"
RAY_SRC=$(ls "$TMP"/ray/ray-"$RAY_V"-*.whl)
log "ray==$RAY_V: repack without ${RAY_DROP[*]}"
python3 - "$RAY_SRC" "$WHL_DIR/$(basename "$RAY_SRC")" "${RAY_DROP[@]}" <<'EOF'
# Copy every member except the dropped prefixes, in the original order and with the original timestamps
# (so the output is reproducible), then write RECORD without the rows of the dropped files, so that the
# installed RECORD lists exactly what is on disk (pip 23 installs a stale RECORD silently; uninstall and
# metadata tools, or a stricter installer, would then trip on rows of files that do not exist).
import csv, io, sys, zipfile
src, dst, drop = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
with zipfile.ZipFile(src) as zin:
    names = zin.namelist()
    record = next(n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.TextIOWrapper(zin.open(record), encoding="utf-8", newline="")))
    gone = {n for n in names if n.startswith(drop)}
    if not gone:
        sys.exit(f"none of {drop} is in {src}: has the wheel's layout changed?")
    kept_rows = [r for r in rows if r and r[0] not in gone]
    dropped_bytes = sum(i.file_size for i in zin.infolist() if i.filename in gone)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename in gone or info.filename == record:
                continue
            zout.writestr(info, zin.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(kept_rows)
        zout.writestr(zin.getinfo(record), buf.getvalue().encode(), compress_type=zipfile.ZIP_DEFLATED)
# Self-check: RECORD and the archive list exactly the same files.
with zipfile.ZipFile(dst) as z:
    listed = {r[0] for r in csv.reader(io.TextIOWrapper(z.open(record), encoding="utf-8", newline="")) if r}
    present = {n for n in z.namelist() if not n.endswith("/")}
    if listed != present:
        sys.exit(f"RECORD mismatch: {sorted(listed ^ present)[:10]}")
print(f"  dropped {len(gone)} files ({dropped_bytes / 2**20:.1f} MiB unpacked), kept {len(present)}", file=sys.stderr)
EOF

# ---- 2. deepspeed: pure-Python wheel built from the sdist against .venv's torch (the GPU image's own
# torch is used at run time). DS_BUILD_OPS=0: no op is compiled now; on the GPU DeepSpeed JIT-builds an
# op only if the job asks for one (this project passes torch's AdamW, so none).
# Byte-identical rebuilds: --no-cache-dir (else pip reuses a wheel cached by an earlier install),
# SOURCE_DATE_EPOCH (zip timestamps), PYTHONHASHSEED=0 (setup.py builds the "all" extra from a set).
# Note: setup.py records the build-time accelerator ('cpu') and torch version in
# deepspeed/git_version_info_installed.py; DeepSpeed reads them only to load prebuilt ops (none here),
# and training/loop.py sets DS_ACCELERATOR=cuda on GPU workers.
DS_V=$(pin deepspeed)
log "deepspeed==$DS_V: build (pip wheel, no build isolation, .venv's torch)"
PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=315532800 DS_BUILD_OPS=0 \
    "$VENV_PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed \
    -w "$TMP/ds" "deepspeed==$DS_V" >&2 2> >(sed '/neither a file nor a directory/d' >&2)
cp "$TMP"/ds/deepspeed-"$DS_V"-py3-none-any.whl "$WHL_DIR/"

# ---- 3. the missing runtime dependencies, pinned by the lock, one version each.
SPECS=()
for d in "${DEPS[@]}"; do SPECS+=("$d==$(pin "$d")"); done
log "download: ${SPECS[*]}"
pip_quiet download -q --no-deps "${TARGET[@]}" -d "$WHL_DIR" "${SPECS[@]}"

# ---- 4. checks: one version per project; every requirement carried or on the image; size under the cap.
"$VENV_PY" - "$WHL_DIR" "$IMAGE_LIST" <<'EOF'
import os, re, sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

whl_dir, image_list = sys.argv[1], sys.argv[2]
# The GPU machine: CPython 3.12 on Linux x86-64. Extras evaluated: none, plus ray's data and train.
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
EXTRAS = {"ray": ("", "data", "train")}

carried = {}                                    # name -> (version, requirements)
for f in sorted(os.listdir(whl_dir)):
    if not f.endswith(".whl"):
        continue
    name, version, _, _ = parse_wheel_filename(f)
    if name in carried:
        sys.exit(f"two versions of {name} in {whl_dir}: pip --no-deps would stop on them")
    with zipfile.ZipFile(os.path.join(whl_dir, f)) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode("utf-8"))
    carried[name] = (version, [Requirement(r) for r in msg.get_all("Requires-Dist") or []])

image = None
if os.path.isfile(image_list):
    text = open(image_list, encoding="utf-8").read()
    m = re.search(r"## Python packages already there.*?Packages: (.*?)\.\s*$", text, re.S | re.M)
    if m:
        image = {canonicalize_name(p.strip()) for p in m.group(1).split(",") if p.strip()}
if image is None:
    print(f"  [scan] no package list at {image_list}: dependency scan skipped", file=sys.stderr)
    sys.exit(0)

missing, on_image = [], {}
for name, (version, reqs) in carried.items():
    for extra in EXTRAS.get(name, ("",)):
        for r in reqs:
            if r.marker is not None and not r.marker.evaluate({**ENV, "extra": extra}):
                continue
            if r.marker is None and extra:
                continue                        # unconditional ones are checked with extra ""
            dep = canonicalize_name(r.name)
            who = f"{name}[{extra}]" if extra else name
            if dep in carried:
                if not r.specifier.contains(carried[dep][0], prereleases=True):
                    missing.append(f"{who} needs {r}, carried {dep} {carried[dep][0]}")
            elif dep in image:
                if str(r.specifier):
                    on_image.setdefault(dep, set()).add(f"{r.specifier} ({who})")
            else:
                missing.append(f"{who} needs {r}: neither carried nor on the image")
for dep, specs in sorted(on_image.items()):
    print(f"  [scan] on the image, version not checked here: {dep} {'; '.join(sorted(specs))}", file=sys.stderr)
also = sorted(set(carried) & image)
if also:
    print(f"  [scan] carried though the image has them (carried copy wins on PYTHONPATH): {also}", file=sys.stderr)
if missing:
    sys.exit("  [scan] unmet requirements:\n    " + "\n    ".join(missing))
print(f"  [scan] ok: every requirement of the {len(carried)} wheels (ray with [data,train]) is carried or on the image",
      file=sys.stderr)
EOF

log "wheels in $WHL_DIR:"
total=0
for f in "$WHL_DIR"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '  %10d  %s  %s\n' "$size" "$(sha256sum "$f" | cut -c1-16)" "$(basename "$f")"
done
max=$((MAX_MIB * 1024 * 1024))
printf 'total: %d bytes (%s MiB), cap %s MiB\n' "$total" "$(awk "BEGIN{printf \"%.2f\", $total/1048576}")" "$MAX_MIB"
if [ "$total" -gt "$max" ]; then
    log "FAIL: $WHL_DIR is over the $MAX_MIB MiB cap"
    exit 1
fi
