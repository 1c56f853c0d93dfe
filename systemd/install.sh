#!/usr/bin/env bash
# Install and start pose-service under systemd. Safe to run again (after `git pull` or a config
# change): unchanged units are left alone, changed ones are replaced and the service restarted.
#
#   sudo systemd/install.sh                      # system unit pose-service.service, port 5000
#   sudo systemd/install.sh --gpu 0 --gpu 1      # per-GPU units pose-service@0/@1, ports 5100/5101
#   systemd/install.sh --user-unit               # per-user unit (no root), ~/.config/systemd/user
#   ... --prefix /srv/pose-service               # where the repo and its .venv live
#
# Expects `make install` to have been run in the prefix (it creates <prefix>/.venv).
# Remove:  systemctl disable --now pose-service; rm /etc/systemd/system/pose-service*.service;
#          systemctl daemon-reload   (state in /var/lib/pose-service is kept)
set -euo pipefail

PREFIX=/opt/pose-service
USER_UNIT=0
GPUS=()
SVC_USER=pose-service

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --user-unit) USER_UNIT=1; shift ;;
    --gpu) [[ $# -ge 2 ]] || die "--gpu needs an index"; GPUS+=("$2"); shift 2 ;;
    --gpu=*) GPUS+=("${1#*=}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

PREFIX="${PREFIX%/}"
[[ "$PREFIX" == /* ]] || die "--prefix must be an absolute path: $PREFIX"
# ExecStart= lines are split on whitespace and the path goes through sed below.
[[ "$PREFIX" =~ ^[A-Za-z0-9._/+-]+$ ]] || die "--prefix may only contain letters, digits and ._/+-"
for g in "${GPUS[@]}"; do
  [[ "$g" =~ ^[0-9]$ ]] || die "--gpu takes 0-9 (ports are 510N); for more, use a drop-in: $g"
done
(( USER_UNIT == 0 || ${#GPUS[@]} == 0 )) || die "--gpu is for system units; not combinable with --user-unit"

BIN="$PREFIX/.venv/bin/pose-service"
[[ -x "$BIN" ]] || die "$BIN not found: run 'make install' in $PREFIX first"
command -v systemctl >/dev/null || die "systemctl not found"
[[ -d /run/systemd/system ]] || die "systemd is not running as init. Under WSL put
  [boot]
  systemd=true
in /etc/wsl.conf, then 'wsl --shutdown' from Windows (see systemd/wsl/README.md)"

# install_file SRC DEST: write SRC (prefix substituted) to DEST if different. Prints "changed".
install_file() {
  local src="$1" dest="$2" tmp
  tmp="$(mktemp)"
  sed "s#/opt/pose-service#${PREFIX}#g" "$src" >"$tmp"
  if [[ -f "$dest" ]] && cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
  else
    install -D -m 0644 "$tmp" "$dest"
    rm -f "$tmp"
    echo changed
  fi
}

# enable_start SYSTEMCTL... UNIT CHANGED: enable + start; restart if it was running an old unit file.
enable_start() {
  local unit="${*: -2:1}" changed="${*: -1}"
  local ctl=("${@:1:$#-2}") was
  was="$("${ctl[@]}" is-active "$unit" 2>/dev/null || true)"
  "${ctl[@]}" enable --now "$unit"
  if [[ -n "$changed" && "$was" == active ]]; then
    "${ctl[@]}" restart "$unit"
  fi
  say "$unit: $("${ctl[@]}" is-active "$unit" || true)"
}

if (( USER_UNIT )); then
  (( EUID != 0 )) || die "--user-unit installs for the calling user; run it without sudo"
  systemctl --user show-environment >/dev/null 2>&1 || die "no systemd user manager for $USER"
  UNIT_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
  tmp_unit="$(mktemp)"
  trap 'rm -f "$tmp_unit"' EXIT
  # User variant: same supervision settings; state in ~/.local/state/pose-service (%S),
  # sockets in $XDG_RUNTIME_DIR/pose-service (%t). Weights stay in the user's own ~/.cache.
  # No OOMScoreAdjust: an unprivileged manager may not lower it, and the unit would fail.
  cat >"$tmp_unit" <<'EOF'
# pose-service (user unit), installed by systemd/install.sh --user-unit. See pose-service.service.
[Unit]
Description=pose-service 3D human pose daemon (user)
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart=/opt/pose-service/.venv/bin/pose-service serve state_dir=%S/pose-service runtime_dir=%t/pose-service
StateDirectory=pose-service
RuntimeDirectory=pose-service
RuntimeDirectoryMode=0700
WorkingDirectory=%S/pose-service
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2
RestartSteps=5
RestartMaxDelaySec=60
WatchdogSec=30
TimeoutStartSec=120
KillMode=mixed
TimeoutStopSec=60
OOMPolicy=continue

[Install]
WantedBy=default.target
EOF
  changed="$(install_file "$tmp_unit" "$UNIT_DIR/pose-service.service")"
  systemctl --user daemon-reload
  enable_start systemctl --user pose-service.service "$changed"
  # Without lingering the user manager (and the service) stops when the last session ends.
  if [[ "$(loginctl show-user "$USER" -p Linger --value 2>/dev/null || true)" != yes ]]; then
    loginctl enable-linger "$USER" || say "could not enable lingering; run: sudo loginctl enable-linger $USER"
  fi
  say "logs: journalctl --user -u pose-service -f"
  exit 0
fi

(( EUID == 0 )) || die "system install needs root (sudo), or use --user-unit"

if ! getent passwd "$SVC_USER" >/dev/null; then
  nologin="$(command -v nologin || echo /bin/false)"
  say "creating system user $SVC_USER"
  useradd --system --user-group --home-dir /var/lib/pose-service --no-create-home \
    --shell "$nologin" --comment "pose-service daemon" "$SVC_USER"
fi
# The daemon runs as $SVC_USER and must be able to execute the venv.
if command -v runuser >/dev/null && ! runuser -u "$SVC_USER" -- test -x "$BIN"; then
  say "warning: $SVC_USER cannot execute $BIN (check permissions on $PREFIX and its parents)"
fi

UNIT_DIR=/etc/systemd/system
if (( ${#GPUS[@]} == 0 )); then
  changed="$(install_file "$PREFIX/systemd/pose-service.service" "$UNIT_DIR/pose-service.service")"
  systemctl daemon-reload
  enable_start systemctl pose-service.service "$changed"
  units=(pose-service); port=5000
else
  changed="$(install_file "$PREFIX/systemd/pose-service@.service" "$UNIT_DIR/pose-service@.service")"
  systemctl daemon-reload
  for g in "${GPUS[@]}"; do
    enable_start systemctl "pose-service@$g.service" "$changed"
  done
  units=("${GPUS[@]/#/pose-service@}"); port="510${GPUS[0]}"
fi

say "weights for the GPU engine go in /var/lib/pose-service/.cache (HOME of $SVC_USER)"
say "check: systemctl status ${units[*]}  |  journalctl -u ${units[0]} -f  |  curl -s http://127.0.0.1:$port/v1/health"
