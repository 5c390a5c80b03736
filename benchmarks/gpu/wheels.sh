# Sourced by the benchmarks/gpu/*_device.sh scripts, from the repository root: installs the carried wheels
# (.whl, made by benchmarks/gpu/build_wheels.sh: DeepSpeed, Ray and their pure-Python dependencies) into
# /tmp/site once per machine (a warm machine keeps it between calls), then puts them and the repository on
# the paths. One place for it, so every device script installs the same way.
# The marker holds the wheels' names and sizes: a rebuilt .whl is installed again on a warm machine.
_wheels_id=$( (cd .whl 2>/dev/null && stat -c '%n %s' -- *.whl) | md5sum | cut -c1-16)
if [ -d .whl ] && [ "$(cat /tmp/site/.installed 2>/dev/null)" != "$_wheels_id" ]; then
    _wheels_t0=$(date +%s)
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && echo "$_wheels_id" > /tmp/site/.installed || { echo "wheel install failed"; exit 1; }
    echo "[device] wheels installed in $(( $(date +%s) - _wheels_t0 ))s"
elif [ ! -f /tmp/site/.installed ]; then
    echo "[device] no .whl here and none installed: Ray and DeepSpeed will be missing (pass carry: [\".whl\"]," \
         "made by benchmarks/gpu/build_wheels.sh)"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH RAY_DEDUP_LOGS=0
