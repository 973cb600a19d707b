#!/bin/bash
# The nexd package under a real systemd. `cargo xtask vm-test --systemd`
# boots a minimal Debian (bookworm, systemd as PID 1) with this script, the
# amd64 .deb and the kernel modules in its initramfs; nexd-vm-test.service
# runs it once the system is up. It prints one line per check ("ok - ..."
# or "not ok - ..."), then "N passed, N failed" and NEXD-VM-RESULT: <failed>.
#
# Two devices: this VM's root namespace is the client, run by systemd from
# the package (exit-node client with the kill switch); the exit node runs
# by hand in the namespace "exit". Both reach the namespace "up" (their
# upstream router, with the "internet" 203.0.113.1 / 2001:db8:3::1), where
# nftables counts what crosses it. Everything here is inside the VM.
set -u
DEB=$1
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $*"; }
not_ok() { fail=$((fail + 1)); echo "not ok - $*"; }
# check DESCRIPTION COMMAND...: one check of a command's success.
check() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else not_ok "$what"; fi
}
# eventually SECONDS DESCRIPTION COMMAND...: polls every 0.2 s, bounded.
eventually() {
    local secs=$1 what=$2
    shift 2
    local start=$SECONDS
    while ((SECONDS - start < secs)); do
        if "$@" >/dev/null 2>&1; then
            ok "$what ($((SECONDS - start)) s)"
            return 0
        fi
        sleep 0.2
    done
    not_ok "$what (not within $secs s)"
    return 1
}
section() { echo "=== $* (t=${SECONDS}s)"; }
not() { ! "$@"; }
# quiet COMMAND...: the command's success, its output dropped.
quiet() { "$@" >/dev/null 2>&1; }
main_pid() { systemctl show -p MainPID --value nexd; }
counter() { ip netns exec up nft list counter inet watch "$1" | sed -n 's/.*packets \([0-9]*\).*/\1/p'; }
same() { [ "$1" = "$2" ]; }

# What the client's network looks like, for before/after comparisons:
# links, addresses, rules, routes, nftables, TC qdiscs and filters, pins,
# the sysctls nexd may change.
net_state() {
    # Duplicate address detection finishes on its own schedule: an address
    # still "tentative" in one snapshot and not in the next is the kernel's
    # doing, not the install's. Wait (bounded) for it to settle first.
    for _ in $(seq 50); do
        ip addr show | grep -q tentative || break
        sleep 0.1
    done
    ip -d link show | sed 's/ qlen [0-9]*//'
    ip addr show
    ip rule show
    ip -6 rule show
    ip route show table all
    ip -6 route show table all
    nft list ruleset
    tc qdisc show
    for dev in $(ls /sys/class/net); do
        for dir in ingress egress; do
            echo "tc filter $dev $dir:"
            tc filter show dev "$dev" "$dir" 2>/dev/null
        done
    done
    find /sys/fs/bpf
    for s in ipv4/ip_forward ipv6/conf/all/forwarding ipv4/conf/all/src_valid_mark \
        ipv4/conf/all/rp_filter; do
        echo "$s = $(cat /proc/sys/net/$s)"
    done
}

# Every path on the root file system but the API and scratch ones, this
# script's own (/root), and the logs of the journal and of dpkg itself,
# which record the test.
files() {
    find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run \
        -o -path /tmp -o -path /var/tmp -o -path /root -o -path /var/log/journal \
        -o -path /var/log/dpkg.log \) \
        -prune -o -print | sort
}

section "boot"
echo "kernel $(uname -r), $(systemctl --version | head -1)"
# The image holds a subset of the kernel's modules; index them so the
# kernel's module autoloading (WireGuard, nf_tables...) finds them.
depmod -a
# (Not --wait: this script's own unit is still starting.)
echo "system state: $(systemctl is-system-running)"
systemctl --no-pager --failed
files >/root/files.before

section "topology"
ip netns add up
ip netns add exit
ip link add up0 type veth peer name c0 netns up
ip link add e0 netns exit type veth peer name x0 netns up
ip link set lo up
ip addr add 192.0.2.2/24 dev up0
ip -6 addr add 2001:db8:1::2/64 dev up0 nodad
ip link set up0 up
ip route add default via 192.0.2.1
ip -6 route add default via 2001:db8:1::1
ip -n up link set lo up
ip -n up addr add 192.0.2.1/24 dev c0
ip -n up -6 addr add 2001:db8:1::1/64 dev c0 nodad
ip -n up addr add 198.51.100.1/24 dev x0
ip -n up -6 addr add 2001:db8:2::1/64 dev x0 nodad
ip -n up addr add 203.0.113.1/32 dev lo
ip -n up -6 addr add 2001:db8:3::1/128 dev lo
for l in c0 x0; do ip -n up link set "$l" up; done
ip netns exec up sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward; echo 1 >/proc/sys/net/ipv6/conf/all/forwarding'
ip -n exit link set lo up
ip -n exit addr add 198.51.100.2/24 dev e0
ip -n exit -6 addr add 2001:db8:2::2/64 dev e0 nodad
ip -n exit link set e0 up
ip -n exit route add default via 198.51.100.1
ip -n exit -6 route add default via 2001:db8:2::1
# leaked: the client's own packets to the internet, arriving directly.
# via_exit: packets to the internet sent by the exit node (the source
# address the internet sees is the exit's).
ip netns exec up nft -f - <<'EOF'
table inet watch {
    counter leaked {}
    counter via_exit {}
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname "c0" ip daddr 203.0.113.0/24 counter name "leaked"
        iifname "c0" ip6 daddr 2001:db8:3::/64 counter name "leaked"
        iifname "x0" ip saddr 198.51.100.2 ip daddr 203.0.113.1 counter name "via_exit"
    }
}
EOF
check "the internet answers directly before nexd runs" quiet ping -c 1 -W 5 203.0.113.1
direct=$(counter leaked)

section "install"
net_state >/root/net.before-install
check "dpkg -i installs the package" dpkg -i "$DEB"
check "the service is not enabled by the install" same "$(systemctl is-enabled nexd)" disabled
check "the service is not started by the install" same "$(systemctl is-active nexd)" inactive
net_state >/root/net.after-install
check "the install touched no network configuration" diff -u /root/net.before-install /root/net.after-install
for f in /usr/bin/nexd /usr/bin/nexctl; do check "$f is executable" test -x "$f"; done
for f in /usr/lib/systemd/system/nexd.service /etc/default/nexd /usr/share/man/man8/nexd.8.gz \
    /usr/share/man/man8/nexctl.8.gz /usr/share/bash-completion/completions/nexctl \
    /usr/share/zsh/vendor-completions/_nexctl /usr/share/fish/vendor_completions.d/nexctl.fish; do
    check "$f is installed" test -s "$f"
done
conffiles=$(dpkg-query -W -f='${Conffiles}' nexd)
for f in /etc/nexd/nexd.toml /etc/nexd/mesh.toml /etc/default/nexd; do
    check "$f is a conffile" grep -q " $f " <<<"$conffiles"
done
verify=$(systemd-analyze verify --man=no nexd.service 2>&1)
check "systemd-analyze verify finds nothing wrong with the unit" test -z "$verify"
[ -n "$verify" ] && echo "$verify"
systemd-analyze security --no-pager nexd.service | tail -1

section "readiness"
# With the shipped example files (no device listed) nexd cannot start: a
# Type=notify unit must then fail to start, not report active and die.
if systemctl start nexd 2>/dev/null; then
    not_ok "start fails while the mesh file does not list this device"
else
    ok "start fails while the mesh file does not list this device"
fi
systemctl stop nexd
systemctl reset-failed nexd
client_key=$(nexd keygen)
check "nexd keygen created the device key (0600)" same "$(stat -c %a /var/lib/nexd/private.key)" 600
mkdir -p /root/exit
exit_key=$(nexd keygen --state-dir /var/lib/nexd-exit)
cat >/etc/nexd/mesh.toml <<EOF
[[device]]
name = "client"
public_key = "$client_key"
endpoint = "192.0.2.2:51820"
ipv4 = "100.64.0.2"
ipv6 = "fd6e:6578:6400::2"

[[device]]
name = "exit"
public_key = "$exit_key"
endpoint = "198.51.100.2:51820"
ipv4 = "100.64.0.1"
ipv6 = "fd6e:6578:6400::1"
exit_node = true
EOF
cp /etc/nexd/mesh.toml /root/exit/mesh.toml
touch /root/exit/nexd.toml
cat >/etc/nexd/nexd.toml <<'EOF'
exit-node-client = true
kill-switch = true
log-level = "debug"
EOF
ip netns exec exit nexd router --exit-node --config /root/exit/nexd.toml \
    --mesh-file /root/exit/mesh.toml --state-dir /var/lib/nexd-exit \
    --socket /run/nexd-exit.sock --uplink e0 >/root/exit/log 2>&1 &
exit_pid=$!
eventually 60 "the exit node (by hand, in its namespace) answers" \
    nexctl --socket /run/nexd-exit.sock nexd status
net_state >/root/net.before-start
t0=$SECONDS
if systemctl start nexd; then
    ok "systemctl start nexd ($((SECONDS - t0)) s)"
else
    not_ok "systemctl start nexd"
    journalctl -b -u nexd --no-pager | tail -30
fi
# No waiting from here: readiness must mean nexd is up.
check "active right after start returns" same "$(systemctl is-active nexd)" active
check "nexctl answers right after start returns" nexctl nexd status
check "wg0 exists right after start returns" quiet ip link show wg0
has_exit() { nexctl nexd peers list | grep -q "$exit_key"; }
check "the exit node is a peer right after start returns" has_exit
nexctl nexd status

section "socket permissions"
check "the control socket is root's, mode 0600" same "$(stat -c '%a %U %G' /run/nexd.sock)" "600 root root"
setpriv --reuid=65534 --regid=65534 --clear-groups nexctl nexd status >/dev/null 2>&1
check "another user gets exit status 4 (permission denied)" same "$?" 4

section "exit node"
client_active() { nexctl -o json nexd status | grep -Eq '"client_phase": ?"active"'; }
eventually 90 "the client uses the exit node" client_active
before=$(counter via_exit)
check "the internet answers through the tunnel" quiet ping -c 3 -i 0.2 -W 3 203.0.113.1
check "it saw the exit node's address (source-address proof)" test "$(counter via_exit)" -gt "$before"
n=$(($(counter leaked) - direct))
check "nothing reached the internet directly ($n packets)" same "$n" 0

section "reload"
third_key=$(nexd keygen --state-dir /root/third)
pid=$(main_pid)
cat >>/etc/nexd/mesh.toml <<EOF

[[device]]
name = "third"
public_key = "$third_key"
ipv4 = "100.64.0.3"
ipv6 = "fd6e:6578:6400::3"
EOF
check "systemctl reload nexd" systemctl reload nexd
has_third() { nexctl nexd peers list | grep -q "$third_key"; }
eventually 30 "the reload applied the new device" has_third
check "the reload kept the process" same "$(main_pid)" "$pid"
check "active after the reload" same "$(systemctl is-active nexd)" active

section "systemctl restart"
# A clean stop removes the leak guard with everything else (stopping means
# the direct path is back), so a restart has a window without it: counted
# and shown, not checked.
leaked=$(counter leaked)
ping -i 0.05 -w 120 -W 1 203.0.113.1 >/dev/null 2>&1 &
pinger=$!
sleep 1
check "systemctl restart nexd" systemctl restart nexd
eventually 90 "the client uses the exit node again after the restart" client_active
sleep 1
kill -INT "$pinger" 2>/dev/null
wait "$pinger"
echo "note: $(($(counter leaked) - leaked)) packets went out directly during systemctl restart"

section "SIGKILL and restart"
leaked=$(counter leaked)
restarts=$(systemctl show -p NRestarts --value nexd)
# Traffic all along (bounded by -w); stopped once nexd has converged.
ping -i 0.05 -w 150 -W 1 203.0.113.1 >/root/ping4.log 2>&1 &
ping4=$!
ping -6 -i 0.1 -w 150 -W 1 2001:db8:3::1 >/root/ping6.log 2>&1 &
ping6=$!
sleep 2
pid=$(main_pid)
killed_at=$(date +%s)
check "systemctl kill -s KILL nexd" systemctl kill -s KILL nexd
restarted() { p=$(main_pid); [ "$p" != 0 ] && [ "$p" != "$pid" ] && [ "$(systemctl is-active nexd)" = active ]; }
eventually 60 "systemd restarted nexd" restarted
check "one restart counted" same "$(systemctl show -p NRestarts --value nexd)" "$((restarts + 1))"
before=$(counter via_exit)
converged() { ping -c 1 -W 2 203.0.113.1 && [ "$(counter via_exit)" -gt "$before" ]; }
eventually 90 "the restarted nexd converged: internet through the exit node again" converged
sleep 2
kill -INT "$ping4" "$ping6" 2>/dev/null
wait "$ping4" "$ping6"
tail -2 /root/ping4.log
n=$(($(counter leaked) - leaked))
check "no packet leaked across the kill and restart ($n counted upstream)" same "$n" 0
echo "the restarted nexd's first log lines:"
journalctl -u nexd --since "@$killed_at" --no-pager -o cat | grep -v ' DEBUG ' | head -25

section "stop"
check "systemctl stop nexd" systemctl stop nexd
check "inactive (a clean exit, not failed)" same "$(systemctl is-active nexd)" inactive
net_state >/root/net.after-stop
check "stop removed everything nexd installed" diff -u /root/net.before-start /root/net.after-stop
check "the control socket is gone" test ! -e /run/nexd.sock

section "journal"
journalctl -b -u nexd --no-pager -o cat >/root/journal
denied=$(grep -Ei 'permission denied|operation not permitted|os error (1|13|30)\b|EPERM|EACCES|read-only file system|could not raise' /root/journal)
check "the journal of nexd has no permission errors" test -z "$denied"
[ -n "$denied" ] && echo "$denied"
unit_warnings=$(journalctl -b --no-pager -o cat | grep -i 'nexd.service' | grep -Ei 'unknown|invalid|ignoring|deprecated')
check "systemd did not complain about the unit" test -z "$unit_warnings"
[ -n "$unit_warnings" ] && echo "$unit_warnings"
echo "nexd's warnings and errors:"
grep -E ' (WARN|ERROR) ' /root/journal | head -20

section "purge"
kill "$exit_pid"
for _ in $(seq 1 100); do kill -0 "$exit_pid" 2>/dev/null || break; sleep 0.1; done
ip netns del exit
ip netns del up
rm -rf /var/lib/nexd-exit
check "dpkg --purge nexd" dpkg --purge nexd
check "dpkg has no record of the package" not quiet dpkg -s nexd
check "/var/lib/nexd is gone" test ! -e /var/lib/nexd
check "/etc/nexd is gone" test ! -e /etc/nexd
files >/root/files.after
check "purge left no file behind (and removed none of others)" diff -u /root/files.before /root/files.after

echo "$pass passed, $fail failed"
echo "NEXD-VM-RESULT: $fail"
systemctl --no-block poweroff
