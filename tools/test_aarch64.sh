#!/usr/bin/env bash
# Build the committed HEAD of this repo into an aarch64 wheel and run its tests,
# on an x86_64 machine, under qemu-user emulation inside a Debian arm64 chroot.
#
#   sudo tools/test_aarch64.sh                 # default: -m "not slow"
#   sudo tools/test_aarch64.sh -- -k matmul -x # extra args after -- go to pytest
#
# Needs root (apt-get, mount, chroot). Idempotent: host tools, binfmt, the arm64
# root and its venv are created only when missing; every run exports a fresh
# copy of `git archive HEAD` (uncommitted changes are NOT tested).
#
# Environment knobs:
#   SAGD_ARM64_ROOT    arm64 root dir            (default /opt/sagd-arm64)
#   SAGD_ARM64_SUITE   Debian suite for a new root (default bookworm -> Python 3.11)
#   SAGD_ARM64_MIRROR  Debian mirror for debootstrap (default: debootstrap's own)
#   SAGD_QEMU_CPU      qemu CPU model, e.g. neoverse-n1, cortex-a72 (default: qemu's
#                      "max", which has SVE+SME; OpenBLAS then picks SME kernels that
#                      raise spurious FP flags -> numpy "divide by zero in matmul")
#   SAGD_ARM64_VERBOSE=1  pass -v to pip wheel (shows compiler command lines)
set -euo pipefail

ROOT=${SAGD_ARM64_ROOT:-/opt/sagd-arm64}
SUITE=${SAGD_ARM64_SUITE:-bookworm}
MIRROR=${SAGD_ARM64_MIRROR:-}
DEBS=python3,python3-venv,python3-dev,gcc,libc6-dev
VENV=/opt/v                       # path inside the chroot
SRC=/src                          # exported source tree, inside the chroot
TESTRUN=/testrun                  # tests are copied here (outside the source tree)
BASE_REQS=("numpy>=2" scipy "Cython>=3" setuptools wheel pytest hypothesis
           ml_dtypes pytest-benchmark)

PYTEST_EXTRA=()
while (($#)); do
  case $1 in
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (pytest args go after --)" >&2; exit 2 ;;
  esac
done

STEP="startup"
declare -A TIMES=()
TIME_ORDER=()
T0=$(date +%s)
step() { STEP=$1; echo; echo "=== [aarch64] $STEP"; }
_ts=""
t_start() { _ts=$(date +%s); }
t_end() { local d=$(( $(date +%s) - _ts )); _ts=""; TIMES[$1]=$d; TIME_ORDER+=("$1"); echo "--- [aarch64] $1: ${d}s"; }

unmount_all() {
  local m
  for m in "$ROOT/dev" "$ROOT/proc"; do
    if mountpoint -q "$m" 2>/dev/null; then
      umount "$m" 2>/dev/null || umount -l "$m" || echo "WARNING: could not unmount $m" >&2
    fi
  done
}
on_exit() {
  local rc=$?
  set +e
  unmount_all
  echo
  if ((${#TIME_ORDER[@]})) || [[ -n $_ts ]]; then
    echo "=== [aarch64] timings (s):"
    for k in "${TIME_ORDER[@]}"; do printf '    %-12s %5d\n' "$k" "${TIMES[$k]}"; done
    if [[ -n $_ts ]]; then printf '    %-12s %5d  (unfinished)\n' "${STEP%% *}" $(( $(date +%s) - _ts )); fi
    printf '    %-12s %5d\n' total $(( $(date +%s) - T0 ))
  fi
  if ((rc == 0)); then
    echo "=== [aarch64] OK"
  else
    echo "=== [aarch64] FAILED in step: $STEP (exit code $rc)" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Run a command inside the chroot with a clean environment: the outer machine's
# PIP_FIND_LINKS / PIP_CERT / pip.conf constraint etc. point at host paths.
# (The outer /etc/pip.conf, /etc/xdg/pip and ~/.config/pip are not in the root.)
CENV=(HOME=/root LANG=C.UTF-8 TMPDIR=/tmp
      "PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
      PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_NO_INPUT=1
      PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive)
if [[ -n ${SAGD_QEMU_CPU:-} ]]; then CENV+=("QEMU_CPU=$SAGD_QEMU_CPU"); fi
for v in OMP_NUM_THREADS OPENBLAS_NUM_THREADS OPENBLAS_CORETYPE PYTHONHASHSEED CI; do
  if [[ -n ${!v:-} ]]; then CENV+=("$v=${!v}"); fi
done
in_root() {           # in_root [-C dir] cmd args...
  local cd=/
  if [[ $1 == -C ]]; then cd=$2; shift 2; fi
  chroot "$ROOT" /usr/bin/env -i -C "$cd" "${CENV[@]}" "$@"
}

# ---------------------------------------------------------------- checks
step "checks"
[[ $(id -u) -eq 0 ]] || { echo "must run as root (apt-get, mount, chroot)" >&2; exit 1; }
[[ $(uname -m) == x86_64 || $(uname -m) == aarch64 ]] || echo "note: host is $(uname -m)"
case $ROOT in /|"") echo "refusing SAGD_ARM64_ROOT='$ROOT'" >&2; exit 1 ;; esac
REPO=$(git -C "$(dirname "$(readlink -f "$0")")" rev-parse --show-toplevel) \
  || { echo "script is not inside a git work tree" >&2; exit 1; }
git -C "$REPO" rev-parse --verify -q HEAD >/dev/null \
  || { echo "repo $REPO has no commits: nothing to export" >&2; exit 1; }
echo "repo: $REPO @ $(git -C "$REPO" rev-parse --short HEAD)   root: $ROOT"
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
  echo "WARNING: uncommitted changes in $REPO are NOT part of this test (HEAD only)"
fi
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -n 9 || { echo "another run holds $ROOT.lock" >&2; exit 1; }

t_start
# ---------------------------------------------------------------- host tools
step "host tools (qemu-user-static, debootstrap, binfmt-support)"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v update-binfmts >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support
fi

# ---------------------------------------------------------------- binfmt
step "binfmt_misc registration for qemu-aarch64"
mountpoint -q /proc/sys/fs/binfmt_misc \
  || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
BF=/proc/sys/fs/binfmt_misc/qemu-aarch64
if [[ ! -e $BF ]] || ! grep -qx enabled "$BF"; then
  update-binfmts --enable qemu-aarch64
fi
{ [[ -e $BF ]] && grep -qx enabled "$BF"; } || { echo "qemu-aarch64 binfmt not enabled" >&2; exit 1; }
INTERP=$(sed -n 's/^interpreter //p' "$BF")
if ! grep -q '^flags:.*F' "$BF"; then
  # no "fix binary" flag: the interpreter must exist inside the chroot
  NEED_INTERP_COPY=1
else
  NEED_INTERP_COPY=0
fi
sed -n 's/^/    /p' "$BF" | head -3

# ---------------------------------------------------------------- arm64 root
step "arm64 root at $ROOT"
root_complete() { [[ -x $ROOT/usr/bin/python3 && ! -d $ROOT/debootstrap ]]; }
if ! root_complete; then
  unmount_all
  if [[ -d $ROOT/debootstrap ]]; then
    echo "removing partial debootstrap in $ROOT"
    rm -rf --one-file-system "$ROOT"
  elif [[ -d $ROOT && -n $(ls -A "$ROOT") ]]; then
    echo "$ROOT exists, is not empty and is not a finished arm64 root; remove it or set SAGD_ARM64_ROOT" >&2
    exit 1
  fi
  echo "debootstrap --arch=arm64 $SUITE (a few minutes)..."
  debootstrap --arch=arm64 --variant=minbase --include="$DEBS" "$SUITE" "$ROOT" ${MIRROR:+"$MIRROR"} \
    > "$ROOT.debootstrap.log" 2>&1 \
    || { tail -30 "$ROOT.debootstrap.log" >&2; echo "debootstrap failed; full log: $ROOT.debootstrap.log" >&2; exit 1; }
fi
if ((NEED_INTERP_COPY)); then
  mkdir -p "$ROOT$(dirname "$INTERP")"; cp -f "$INTERP" "$ROOT$INTERP"
fi
# network + CA: the registry is reached through a proxy whose CA is only in the host bundle
cp -fL /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp -f /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
ARCH=$(in_root uname -m)
[[ $ARCH == aarch64 ]] || { echo "uname -m in chroot says '$ARCH', expected aarch64" >&2; exit 1; }
echo "chroot: $ARCH, $(in_root python3 -V)"
MISSING=()
# shellcheck disable=SC2016
INSTALLED=$(in_root dpkg-query -W -f='${Package} ${Status}\n' 2>/dev/null | awk '/ok installed/{print $1}')
for p in ${DEBS//,/ }; do grep -qx "$p" <<<"$INSTALLED" || MISSING+=("$p"); done
if ((${#MISSING[@]})); then
  in_root apt-get update -q && in_root apt-get install -y -q "${MISSING[@]}"
fi

# ---------------------------------------------------------------- venv
step "venv $VENV in the chroot (build + test deps)"
if [[ ! -x $ROOT$VENV/bin/python ]]; then
  in_root python3 -m venv "$VENV"
  in_root "$VENV/bin/python" -m pip install -q -U pip
fi
echo "pip config seen inside the chroot (should list no host paths):"
in_root pip config list | sed 's/^/    /'
if in_root pip config list | grep -Eq '/opt/wheels|/etc/xdg/pip|file:///opt/|find-links|constraint'; then
  echo "WARNING: pip inside the chroot sees outer-machine settings (see above)" >&2
fi
t_end "root-setup"

# ---------------------------------------------------------------- export
step "export git HEAD -> $ROOT$SRC, tests -> $ROOT$TESTRUN"
t_start
rm -rf --one-file-system "$ROOT$SRC" "$ROOT$TESTRUN"
mkdir -p "$ROOT$SRC" "$ROOT$TESTRUN"
git -C "$REPO" archive HEAD | tar -x -C "$ROOT$SRC"
[[ -f $ROOT$SRC/pyproject.toml ]] || { echo "no pyproject.toml at the repo top level" >&2; exit 1; }
[[ -d $ROOT$SRC/tests ]] || { echo "no tests/ at the repo top level" >&2; exit 1; }
cp -a "$ROOT$SRC/tests" "$ROOT$TESTRUN/tests"
# pytest config (markers, filterwarnings, ...) lives at the top level: copy it along
for f in pyproject.toml pytest.ini tox.ini setup.cfg conftest.py; do
  if [[ -f $ROOT$SRC/$f ]]; then cp -a "$ROOT$SRC/$f" "$ROOT$TESTRUN/$f"; fi
done
t_end "export"

# ---------------------------------------------------------------- project deps
step "install build/runtime/test requirements from pyproject.toml"
t_start
in_root python3 - "$SRC/pyproject.toml" > "$ROOT/tmp/sagd-reqs.txt" <<'EOF'
import re, sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
proj = d.get("project", {})
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
reqs = list(d.get("build-system", {}).get("requires", []))
reqs += proj.get("dependencies", [])
reqs += proj.get("optional-dependencies", {}).get("test", [])
for r in reqs:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r)
    if m and norm(m.group(1)) == norm(proj.get("name", "")):
        continue   # self-reference like "sagd[extra]"
    print(r)
EOF
printf '%s\n' "${BASE_REQS[@]}" > "$ROOT/tmp/sagd-base-reqs.txt"
STAMP=$(cat "$ROOT/tmp/sagd-base-reqs.txt" "$ROOT/tmp/sagd-reqs.txt" | sort -u | sha256sum | cut -c1-16)
echo "requirements:"; sort -u "$ROOT/tmp/sagd-base-reqs.txt" "$ROOT/tmp/sagd-reqs.txt" | sed 's/^/    /'
if [[ $(cat "$ROOT$VENV/.sagd-reqs-stamp" 2>/dev/null) != "$STAMP" ]]; then
  in_root pip install -r /tmp/sagd-base-reqs.txt -r /tmp/sagd-reqs.txt
  echo "$STAMP" > "$ROOT$VENV/.sagd-reqs-stamp"
else
  echo "unchanged since last install (stamp $STAMP): skipping pip install"
fi
in_root python -c "import numpy, scipy, Cython, platform; print('   ', platform.machine(), 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'Cython', Cython.__version__)"
t_end "deps"

# ---------------------------------------------------------------- build
step "build wheel (pip wheel --no-build-isolation) in the chroot"
t_start
VFLAG=(); if [[ ${SAGD_ARM64_VERBOSE:-0} == 1 ]]; then VFLAG=(-v); fi
in_root -C "$SRC" pip wheel "${VFLAG[@]}" --no-build-isolation --no-deps -w "$SRC/dist" "$SRC"
shopt -s nullglob
WHEELS=("$ROOT$SRC"/dist/*.whl)
shopt -u nullglob
((${#WHEELS[@]} == 1)) || { echo "expected exactly one wheel in $SRC/dist, got ${#WHEELS[@]}" >&2; exit 1; }
WHEEL=$SRC/dist/$(basename "${WHEELS[0]}")
echo "wheel: $WHEEL ($(du -h "${WHEELS[0]}" | cut -f1))"
[[ $WHEEL == *aarch64.whl ]] || { echo "wheel is not an aarch64 wheel: $WHEEL" >&2; exit 1; }
t_end "build"

# ---------------------------------------------------------------- install
step "install wheel into the chroot venv"
t_start
in_root pip install -q --force-reinstall --no-deps "$WHEEL"
PKG=$(in_root python3 -c "import tomllib; print(tomllib.load(open('$SRC/pyproject.toml','rb'))['project']['name'].replace('-', '_'))")
in_root -C "$TESTRUN" python -c "
import $PKG, sys
f = $PKG.__file__
print('    imported', '$PKG', 'from', f)
sys.exit(0 if f.startswith('$VENV/') else 'not the installed wheel: ' + f)"
t_end "install"

# ---------------------------------------------------------------- tests
step "pytest (cwd $TESTRUN, outside the source tree)"
t_start
in_root -C "$TESTRUN" python -m pytest "$TESTRUN/tests" -m "not slow" -p no:cacheprovider -q \
  "${PYTEST_EXTRA[@]}"
t_end "tests"
