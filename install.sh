#!/usr/bin/env bash
# Garrison installer.
#
#   ./install.sh                      developer install into ./.venv (every extra + test tools)
#   ./install.sh --system [--root D]  appliance install: user garrison, /opt/garrison, /etc/garrison,
#                                     master key, systemd units (started only when systemd is PID 1)
#   ./install.sh --system --uninstall [--purge] [--root D]
#   ./install.sh --bundle DIR         download everything a fresh machine needs into DIR
#   ./install.sh --offline DIR [...]  install from such a bundle, with no network
#
# Idempotent; stops at the first failure with a message and a non-zero exit.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLAMA_VERSION="0.3.36"
PIP_VERSION="24.3.1"
PYTHON="${GARRISON_PYTHON:-python3}"
WHEELHOUSE="${GARRISON_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/garrison/wheels}"
MODE="dev"
ROOT=""
PURGE=0
UNINSTALL=0
BUNDLE=""
OFFLINE=""
EXTRAS="${GARRISON_SYSTEM_EXTRAS:-}"

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
trap 'die "step failed (line $LINENO): $BASH_COMMAND"' ERR

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --system) MODE="system" ;;
        --root) ROOT="${2:?--root needs a folder}"; shift ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --extras) EXTRAS="${2:?--extras needs a list such as training,onnx}"; shift ;;
        --bundle) MODE="bundle"; BUNDLE="${2:?--bundle needs a folder}"; shift ;;
        --offline) OFFLINE="${2:?--offline needs a bundle folder}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown option: $1" ;;
    esac
    shift
done


pip_install() {
    # Every install goes through here, so --offline means no index at all.
    local py="$1"; shift
    if [ -n "$OFFLINE" ]; then
        "$py" -m pip install --disable-pip-version-check --no-index --find-links "$OFFLINE" "$@"
    else
        "$py" -m pip install --disable-pip-version-check --find-links "$WHEELHOUSE" "$@"
    fi
}

llama_wheel() { ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1; }
llama_sdist() {
    # PyPI names it llama_cpp_python-X.tar.gz (PEP 625) or llama-cpp-python-X.tar.gz (older uploads).
    local f
    for f in "$WHEELHOUSE/llama_cpp_python-$LLAMA_VERSION.tar.gz" "$WHEELHOUSE/llama-cpp-python-$LLAMA_VERSION.tar.gz"; do
        if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
    echo "$WHEELHOUSE/llama_cpp_python-$LLAMA_VERSION.tar.gz"
}

ensure_llama_artifacts() {
    # llama-cpp-python has no binary wheel here: build it once, keep the wheel and the sdist
    # (the sdist also carries the reference converter at the runtime's own revision).
    local py="$1"
    mkdir -p "$WHEELHOUSE"
    if [ ! -f "$(llama_sdist)" ]; then
        [ -z "$OFFLINE" ] || die "bundle lacks $(llama_sdist)"
        say "downloading llama-cpp-python $LLAMA_VERSION source"
        "$py" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_VERSION" -d "$WHEELHOUSE" >/dev/null
    fi
    if [ -z "$(llama_wheel)" ]; then
        [ -z "$OFFLINE" ] || die "bundle lacks a built llama-cpp-python wheel"
        say "building llama-cpp-python $LLAMA_VERSION (once; about 5 minutes on 2 cores)"
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
            "$py" -m pip wheel --disable-pip-version-check --no-deps "$(llama_sdist)" -w "$WHEELHOUSE" >/dev/null
    else
        say "reusing cached wheel $(basename "$(llama_wheel)")"
    fi
}

install_converter() {
    # llama.cpp's reference converter at the runtime's revision, beside the venv.
    local venv="$1" dest="$1/share/garrison/llama.cpp" tmp
    local stamp="$dest/.llama-cpp-python-$LLAMA_VERSION"
    if [ -f "$stamp" ]; then return 0; fi
    tmp="$(mktemp -d)"
    tar -xzf "$(llama_sdist)" -C "$tmp" --wildcards \
        '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
        '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' \
        || { rm -rf "$tmp"; die "the llama-cpp-python source does not carry the converter files"; }
    rm -rf "$dest"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp"/*/vendor/llama.cpp "$dest"
    rm -rf "$tmp"
    touch "$stamp"
    say "installed llama.cpp's reference converter into $dest"
}

make_venv() {
    local venv="$1"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv" || die "cannot create a venv with $PYTHON (install python3-venv)"
    fi
    if [ -z "$OFFLINE" ]; then
        "$venv/bin/python" -m pip install --disable-pip-version-check -q "pip==$PIP_VERSION" >/dev/null
    fi
}

apt_packages() {
    # Debian's age (interoperability tests) and systemd (systemd-analyze for the unit tests).
    local missing=()
    command -v age >/dev/null || missing+=(age)
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        say "warning: please install Debian packages: ${missing[*]} (tests that need them will fail)"
        return 0
    fi
    [ -z "$OFFLINE" ] || { say "warning: offline: cannot apt-get ${missing[*]}"; return 0; }
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

install_dev() {
    local venv="$HERE/.venv"
    apt_packages
    make_venv "$venv"
    ensure_llama_artifacts "$venv/bin/python"
    say "installing garrison[training,onnx,dev] into $venv"
    pip_install "$venv/bin/python" -q "llama-cpp-python==$LLAMA_VERSION"
    pip_install "$venv/bin/python" -q -e "$HERE[training,onnx,dev]"
    # An editable install leaves the project's own modules uncompiled (pip compiles what it copies):
    # compiling them here spares every process (each CLI command, each redaction worker) a tenth of a
    # second, also where PYTHONDONTWRITEBYTECODE stops Python from caching what it compiles.
    "$venv/bin/python" -m compileall -q "$HERE/garrison" >/dev/null || die "cannot compile $HERE/garrison"
    install_converter "$venv"
    "$venv/bin/garrison" --version >/dev/null || die "garrison does not start from $venv"
    say "done: $venv/bin/garrison"
}

# ---- appliance (system) install -------------------------------------------------

sys_paths() {
    OPT="$ROOT/opt/garrison"
    ETC="$ROOT/etc/garrison"
    UNITS="$ROOT/etc/systemd/system"
    STATE="$ROOT/var/lib/garrison"
}

systemd_running() { [ -z "$ROOT" ] && [ "$(ps -p 1 -o comm= 2>/dev/null)" = "systemd" ]; }

install_system() {
    sys_paths
    [ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "--system must run as root (or with --root DIR)"
    if [ -z "$ROOT" ]; then
        if ! id garrison >/dev/null 2>&1; then
            useradd --system --home-dir /var/lib/garrison --no-create-home --shell /usr/sbin/nologin garrison
            say "created system user garrison"
        fi
    fi
    make_venv "$OPT"
    ensure_llama_artifacts "$OPT/bin/python"
    local spec="$HERE"
    [ -z "$EXTRAS" ] || spec="$HERE[$EXTRAS]"
    say "installing garrison into $OPT"
    pip_install "$OPT/bin/python" -q "llama-cpp-python==$LLAMA_VERSION"
    pip_install "$OPT/bin/python" -q "$spec"
    install_converter "$OPT"
    install -d -m 0755 "$ETC" "$UNITS" "$OPT/share/doc/garrison"
    install -m 0644 "$HERE"/docs/*.md "$OPT/share/doc/garrison/"
    install -d -m 0700 "$STATE"
    if [ ! -f "$ETC/garrison.toml" ]; then
        install -m 0644 "$HERE/systemd/garrison.toml" "$ETC/garrison.toml"
    fi
    if [ ! -f "$ETC/master.key" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/master.key")
        chmod 0600 "$ETC/master.key"
        say "generated the master key $ETC/master.key (root only; back it up offline)"
    fi
    install -m 0644 "$HERE/systemd/garrison.service" "$UNITS/garrison.service"
    install -m 0644 "$HERE/systemd/garrison-worker.service" "$UNITS/garrison-worker.service"
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --now garrison.service garrison-worker.service
        say "garrison.service enabled and started"
    else
        mkdir -p "$UNITS/multi-user.target.wants"
        ln -sfn ../garrison.service "$UNITS/multi-user.target.wants/garrison.service"
        ln -sfn ../garrison-worker.service "$UNITS/multi-user.target.wants/garrison-worker.service"
        say "systemd is not PID 1 here: units installed and enabled, not started"
    fi
    say "done: $OPT/bin/garrison"
}

uninstall_system() {
    sys_paths
    [ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "--uninstall must run as root (or with --root DIR)"
    if systemd_running; then
        systemctl disable --now garrison.service garrison-worker.service || true
    fi
    rm -f "$UNITS/garrison.service" "$UNITS/garrison-worker.service" \
        "$UNITS/multi-user.target.wants/garrison.service" "$UNITS/multi-user.target.wants/garrison-worker.service"
    if systemd_running; then systemctl daemon-reload; fi
    rm -rf "$OPT"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$STATE" "$ETC"
        if [ -z "$ROOT" ] && id garrison >/dev/null 2>&1; then userdel garrison || true; fi
        say "removed Garrison, its configuration, master key and data"
    else
        say "removed Garrison; kept $ETC and $STATE (use --purge to delete them)"
    fi
}

# ---- bundle for machines with no network ------------------------------------------

make_bundle() {
    mkdir -p "$BUNDLE"
    BUNDLE="$(cd "$BUNDLE" && pwd)"
    WHEELHOUSE_SAVED="$WHEELHOUSE"
    local venv="$HERE/.venv"
    make_venv "$venv"
    ensure_llama_artifacts "$venv/bin/python"
    cp -f "$(llama_wheel)" "$(llama_sdist)" "$BUNDLE/"
    say "downloading every dependency into $BUNDLE"
    "$venv/bin/python" -m pip download --disable-pip-version-check -q -d "$BUNDLE" \
        --find-links "$WHEELHOUSE_SAVED" "pip==$PIP_VERSION" "setuptools>=68" wheel "$HERE[training,onnx,dev]"
    rm -f "$BUNDLE"/garrison-*.tar.gz "$BUNDLE"/garrison-*.zip
    say "done: copy $BUNDLE and this repository to the target, then ./install.sh --offline $BUNDLE"
}

if [ -n "$OFFLINE" ]; then
    OFFLINE="$(cd "$OFFLINE" && pwd)" || die "bundle folder not found: $OFFLINE"
    WHEELHOUSE="$OFFLINE"
    [ -f "$(llama_sdist)" ] || die "$OFFLINE is not a Garrison bundle (no llama-cpp-python source)"
fi

case "$MODE" in
    dev) install_dev ;;
    system) if [ "$UNINSTALL" -eq 1 ]; then uninstall_system; else install_system; fi ;;
    bundle) make_bundle ;;
esac
