#!/usr/bin/env bash
# fjord's two entry points on a fresh Debian machine, as root:
#   ./fjord.sh demo   install what is needed, build, and run a local dev cluster with pods that talk
#   ./fjord.sh test   install what is needed, build, and run the whole test suite
# Everything the demo and the tests create lives in network namespaces; the machine's own
# interfaces, routes, iptables and sysctls are never touched.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config bpftool protobuf-compiler
          etcd-server iproute2 iptables nftables fio wrk nginx python3 curl iputils-ping netcat-openbsd
          e2fsprogs util-linux openssl)

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

setup() {
  if [ "$(id -u)" != 0 ]; then
    echo "fjord.sh must run as root (it creates network namespaces and loads eBPF programs)" >&2
    exit 1
  fi
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install the Rust toolchain (rustup, stable >= 1.95) first" >&2
    exit 1
  fi
  # eBPF maps are pinned under bpffs; a fresh machine may not have it mounted.
  if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
    mount -t bpf bpf /sys/fs/bpf || echo "warning: could not mount bpffs at /sys/fs/bpf" >&2
  fi
}

demo() {
  setup
  say "building fjord (release)"
  cargo build --release -p fjord-agent -p fjord-cni -p fjordctl
  local ctl=target/release/fjordctl
  if $ctl cluster list 2>/dev/null | grep -qw demo; then
    say "removing the previous demo cluster"
    $ctl cluster down --name demo
  fi
  say "fjordctl cluster up --name demo"
  $ctl cluster up --name demo
  say "fjordctl pod add default/web --labels app=web ; fjordctl pod add default/client"
  $ctl pod add default/web --labels app=web
  $ctl pod add default/client
  $ctl pod list -o wide
  local web
  web=$($ctl pod list -o json | python3 -c 'import json,sys; print([p["ip"] for p in json.load(sys.stdin) if p["name"]=="web"][0])')
  say "ICMP: client -> web ($web)"
  $ctl pod exec default/client -- ping -c 3 -W 2 "$web"
  say "TCP: an HTTP server in web, curl from client"
  $ctl pod exec default/web -- timeout 120 python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1 &
  local srv=$!
  for _ in $(seq 50); do $ctl pod exec default/client -- curl -s -o /dev/null "http://$web:8080/" && break; sleep 0.1; done
  $ctl pod exec default/client -- curl -s -w '\nHTTP %{http_code} from %{remote_ip} in %{time_total}s\n' -o /dev/null "http://$web:8080/"
  kill $srv 2>/dev/null || true; wait $srv 2>/dev/null || true
  say "Service: a NodePort (with its ClusterIP) in front of web, load-balanced by eBPF (no iptables)"
  $ctl apply -f - <<'YAML'
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
    nodePort: 30080
YAML
  $ctl get services
  local vip
  vip=$($ctl get services web -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["spec"]["clusterIP"])')
  for _ in $(seq 50); do $ctl get endpoints web | grep -q 8080 && break; sleep 0.1; done
  $ctl get endpoints
  $ctl pod exec default/web -- timeout 120 python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1 &
  srv=$!
  for _ in $(seq 50); do $ctl pod exec default/client -- curl -s -o /dev/null "http://$vip/" && break; sleep 0.1; done
  $ctl pod exec default/client -- curl -s -w '\nHTTP %{http_code} via ClusterIP %{remote_ip}:80 in %{time_total}s\n' -o /dev/null "http://$vip/"
  local node_ip
  node_ip=$($ctl get nodes -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["addresses"][0])')
  say "NodePort: from the external namespace (\"the internet\") to $node_ip:30080"
  $ctl cluster exec -- curl -s -w '\nHTTP %{http_code} via NodePort %{remote_ip}:30080 in %{time_total}s\n' -o /dev/null "http://$node_ip:30080/"
  kill $srv 2>/dev/null || true; wait $srv 2>/dev/null || true
  say "UDP: client -> web"
  $ctl pod exec default/web -- timeout 5 nc -u -l -W 1 9999 &
  sleep 0.3
  echo "hello over udp" | $ctl pod exec default/client -- nc -u -w 1 "$web" 9999 || true
  wait 2>/dev/null || true
  say "fjordctl status --verbose"
  $ctl status --verbose
  say "the demo cluster stays up; try: $ctl pod exec default/client -- ping $web ; remove it with: $ctl cluster down --name demo"
}

tests() {
  setup
  say "building fjord"
  cargo build --workspace --bins
  say "running the test suite (unit, kernel and end-to-end tests)"
  local log rc=0
  log=$(mktemp)
  cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || rc=$?
  # One closing line for the whole suite (cargo prints one per test binary).
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
       END { printf "\nfjord: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
  rm -f "$log"
  return $rc
}

case "${1:-}" in
  demo) demo ;;
  test) tests ;;
  *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
