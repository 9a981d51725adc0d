#!/usr/bin/env bash
# Run tools/arm_check.py on an aarch64 Python + torch under qemu-user emulation.
#
# Why: autopar promises CPU clusters, ARM included (gloo). This proves that autopar's runtime
# (apply_plan + train_step under a data-parallel, a tensor-parallel and the solver's plan, 2 gloo
# ranks) trains a tiny zoo model on aarch64 exactly as one process does, from an x86-64 Debian
# bookworm machine with root, apt and PyPI, and nothing else. It is slow (minutes), so it is not
# in the default test suite; tests/test_arm_emulation.py runs it under `pytest -m slow`.
#
# Usage:  tools/arm_emulation.sh [arm_check.py options...]     (run as root the first time)
#
# Steps (each is skipped when its result is already there, so reruns take only the check):
#   1. host tools from apt: qemu-user-static (the emulator), mmdebstrap, python3-pip.
#   2. an arm64 Debian bookworm root with python3.11, by `mmdebstrap --variant=extract`:
#      packages are only unpacked, no arm64 program runs, so neither binfmt_misc nor a
#      debootstrap second stage under qemu is needed (containers often cannot register
#      binfmt_misc handlers).
#   3. fake CPU identity files in the root (see write_cpu_identity).
#   4. aarch64 cp311 wheels from PyPI (torch==$TORCH_VERSION and what its Requires-Dist pulls,
#      numpy, networkx, ortools), downloaded by the host pip with --platform tags and
#      installed with `pip install --target` into ROOT/opt/site-packages.
#   5. `qemu-aarch64-static -cpu $QEMU_CPU_MODEL -L ROOT ROOT/usr/bin/python3.11 tools/arm_check.py`:
#      the emulator is called explicitly (no binfmt_misc), and arm_check starts its ranks
#      with fork, which needs no exec of an aarch64 binary either.
#
# Environment (all optional):
#   AUTOPAR_ARM_ROOT     work folder (default: <repo>/.arm, git-ignored); holds rootfs/, wheels/
#   AUTOPAR_ARM_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   AUTOPAR_ARM_PYTHON   host Python whose pip downloads wheels (default /usr/bin/python3)
#   AUTOPAR_ARM_TIMEOUT  seconds allowed for the emulated check (default 1800)
#   AUTOPAR_ARM_CPU      emulated CPU: neoverse-n1 (default; AWS Graviton2, NEON only, torch
#                        CPU capability DEFAULT) or neoverse-v1 (Graviton3-like: qemu "max" with
#                        256-bit SVE, torch CPU capability SVE256)
#   TORCH_VERSION        torch wheel version (default 2.13.0, as in the x86 dev venv)
#
# Exit status: 0 and a last line "PASS ..." when the check passes; non-zero otherwise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARM="${AUTOPAR_ARM_ROOT:-$REPO/.arm}"
ROOTFS="$ARM/rootfs"
SITE="$ROOTFS/opt/site-packages"
WHEELS="$ARM/wheels"
MIRROR="${AUTOPAR_ARM_MIRROR:-http://deb.debian.org/debian}"
HOST_PY="${AUTOPAR_ARM_PYTHON:-/usr/bin/python3}"
TIMEOUT="${AUTOPAR_ARM_TIMEOUT:-1800}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SUITE=bookworm               # its python3.11 matches the cp311 wheels
GUEST_PY=/usr/bin/python3.11
DEBS="python3.11,libstdc++6"
REQS=("torch==$TORCH_VERSION" numpy networkx ortools)
ARM_CPU="${AUTOPAR_ARM_CPU:-neoverse-n1}"
# CPU identity per model: qemu 7.2 -cpu value, and what the fake /proc/cpuinfo and MIDR_EL1
# say (implementer 0x41 = Arm; part 0xd0c = Neoverse-N1, 0xd40 = Neoverse-V1; see the Arm
# TRMs' MIDR_EL1 reset values). Features lines are those a Graviton2 / Graviton3 prints.
case "$ARM_CPU" in
neoverse-n1)
    QEMU_CPU_MODEL=neoverse-n1
    CPU_VARIANT=0x3 CPU_PART=0xd0c CPU_REVISION=1 MIDR_EL1=0x00000000413fd0c1
    CPU_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
    ;;
neoverse-v1)
    # qemu 7.2 has no neoverse-v1 model; "max" with a 32-byte (256-bit) SVE vector length
    # gives the SVE width of a Neoverse-V1.
    QEMU_CPU_MODEL=max,sve-default-vector-length=32
    CPU_VARIANT=0x1 CPU_PART=0xd40 CPU_REVISION=1 MIDR_EL1=0x00000000411fd401
    CPU_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng"
    ;;
*)
    echo "FAIL: AUTOPAR_ARM_CPU=$ARM_CPU is not one of neoverse-n1, neoverse-v1"
    exit 2
    ;;
esac

log() { printf '[arm %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[arm] FAIL: %s\n' "$*" >&2; echo "FAIL: $*"; exit 1; }

install_host_tools() {
    local missing=()
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    "$HOST_PY" -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    if ((${#missing[@]} == 0)); then
        log "host tools present: $(qemu-aarch64-static --version | head -1), mmdebstrap, $("$HOST_PY" -m pip --version | cut -d' ' -f1-2)"
        return
    fi
    [[ $EUID -eq 0 ]] || die "need root to apt-get install ${missing[*]}"
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

make_rootfs() {
    if [[ -x "$ROOTFS$GUEST_PY" && -f "$ROOTFS/.autopar-rootfs-ok" ]]; then
        log "arm64 root present: $ROOTFS"
        return
    fi
    [[ $EUID -eq 0 ]] || die "need root for mmdebstrap (mode root) to build $ROOTFS"
    log "mmdebstrap --variant=extract --arch=arm64 --include=$DEBS $SUITE -> $ROOTFS"
    rm -rf "$ROOTFS.tmp" "$ROOTFS"
    mmdebstrap --quiet --variant=extract --arch=arm64 --include="$DEBS" \
        "$SUITE" "$ROOTFS.tmp" "$MIRROR"
    touch "$ROOTFS.tmp/.autopar-rootfs-ok"
    mv "$ROOTFS.tmp" "$ROOTFS"
}

# qemu-user passes the host's x86 /proc/cpuinfo and /sys through. torch's oneDNN (xbyak_aarch64)
# then finds no MIDR_EL1 register file and the import segfaults ("Can't open MIDR_EL1 sysfs
# entry"). With -L ROOT, qemu opens ROOT/<path> before <path>, so files here shadow the host's
# and describe the CPU qemu emulates. Two CPUs, as on this 2-core host.
write_cpu_identity() {
    local cpus=2 cpu dir
    mkdir -p "$ROOTFS/proc" "$ROOTFS/sys/devices/system/cpu"
    : >"$ROOTFS/proc/cpuinfo"
    for ((cpu = 0; cpu < cpus; cpu++)); do
        cat >>"$ROOTFS/proc/cpuinfo" <<EOF
processor	: $cpu
BogoMIPS	: 243.75
Features	: $CPU_FEATURES
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: $CPU_VARIANT
CPU part	: $CPU_PART
CPU revision	: $CPU_REVISION

EOF
        dir="$ROOTFS/sys/devices/system/cpu/cpu$cpu/regs/identification"
        mkdir -p "$dir"
        echo "$MIDR_EL1" >"$dir/midr_el1"
        echo 0x0000000000000000 >"$dir/revidr_el1"
    done
    for f in possible present online; do echo "0-$((cpus - 1))" >"$ROOTFS/sys/devices/system/cpu/$f"; done
}

pip_platform_args() {
    # pip 23 takes --platform tags literally; a manylinux_2_28 wheel does not admit a
    # manylinux_2_27 one, so list every glibc up to bookworm's 2.36.
    local v
    for v in $(seq 17 36); do printf -- '--platform manylinux_2_%s_aarch64 ' "$v"; done
    printf -- '--platform manylinux2014_aarch64 --only-binary=:all: '
    printf -- '--python-version 3.11 --implementation cp --abi cp311'
}

install_wheels() {
    local stamp="$SITE/.autopar-site-ok" want="${REQS[*]}"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "aarch64 site-packages present: $SITE ($want)"
        return
    fi
    mkdir -p "$WHEELS"
    log "pip download (aarch64 cp311, with dependencies) $want -> $WHEELS"
    # shellcheck disable=SC2046  # the platform arguments are meant to split
    "$HOST_PY" -m pip download -q -d "$WHEELS" $(pip_platform_args) "${REQS[@]}"
    log "pip install --target $SITE (unpacking, $(du -sh "$WHEELS" | cut -f1) of wheels)"
    rm -rf "$SITE.tmp" "$SITE"
    # shellcheck disable=SC2046
    "$HOST_PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE.tmp" \
        $(pip_platform_args) "${REQS[@]}"
    echo "$want" >"$SITE.tmp/.autopar-site-ok"
    mv "$SITE.tmp" "$SITE"
}

run_check() {
    log "run: qemu-aarch64-static -cpu $QEMU_CPU_MODEL -L $ROOTFS $ROOTFS$GUEST_PY tools/arm_check.py $*"
    # A clean environment: no host PYTHON* settings, no ~/.local user site (x86 packages).
    env -u PYTHONHOME -u PYTHONSTARTUP PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 \
        timeout "$TIMEOUT" qemu-aarch64-static -cpu "$QEMU_CPU_MODEL" -L "$ROOTFS" \
        "$ROOTFS$GUEST_PY" "$REPO/tools/arm_check.py" "$@"
}

main() {
    local t0 t1 t2 rc
    t0=$(date +%s)
    mkdir -p "$ARM"
    log "work folder: $ARM; emulated CPU: $ARM_CPU (qemu -cpu $QEMU_CPU_MODEL)"
    install_host_tools
    make_rootfs
    write_cpu_identity
    install_wheels
    t1=$(date +%s)
    log "setup done in $((t1 - t0)) s"
    rc=0
    run_check "$@" || rc=$?
    t2=$(date +%s)
    log "check done in $((t2 - t1)) s (exit $rc)"
    if ((rc == 124)); then die "emulated check ran past AUTOPAR_ARM_TIMEOUT=$TIMEOUT s"; fi
    if ((rc != 0)); then echo "FAIL: emulated check exited with status $rc"; fi
    return "$rc"
}

# One line, so bash never reads past it: editing this file during a run cannot change the run.
main "$@"; exit
