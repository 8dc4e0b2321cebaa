#!/usr/bin/env bash
# `make vm-test`: the test suite of `make test`, run inside a virtme-ng VM on
# a second kernel (Debian's 6.1 LTS unless VM_KERNEL names another), over the
# host's file system. The guest runs the test binaries the host already built,
# so nothing compiles under emulation.
#
# Environment: VM_KERNEL (a vmlinuz), VM_CPUS (2), VM_MEMORY (4G),
# VM_KVM (auto|yes|no), VM_TIMEOUT (seconds for the whole VM run, 2100).
set -euo pipefail
cd "$(dirname "$0")/../.."

VNG=${VNG:-target/vng/bin/vng}
CARGO=${CARGO:-cargo}
LOG=target/vm-test.log
start=$SECONDS

kernel=${VM_KERNEL:-}
if [ -z "$kernel" ]; then
	# The kernel the linux-image-amd64 meta-package points at.
	package=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null | sed 's/[ ,(].*//')
	kernel=/boot/vmlinuz-${package#linux-image-}
fi
if [ ! -r "$kernel" ]; then
	echo "vm-test: no kernel image at '$kernel' (install linux-image-amd64 or set VM_KERNEL)" >&2
	exit 2
fi

# The test executables `cargo test --release` runs, in its order. A build
# that fails lists only what was built before the error: refuse it rather
# than run part of the suite.
artifacts=$(mktemp)
if ! $CARGO test --release --no-run --message-format=json >"$artifacts" 2>/dev/null; then
	rm -f "$artifacts"
	echo "vm-test: cargo test --release --no-run failed; run it to see why" >&2
	exit 2
fi
mapfile -t binaries < <(
	/usr/bin/python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["profile"]["test"] and msg.get("executable"):
        print(msg["executable"])
' <"$artifacts"
)
rm -f "$artifacts"
if [ ${#binaries[@]} -eq 0 ]; then
	echo "vm-test: cargo test --release --no-run listed no test executable" >&2
	exit 2
fi

# Nested KVM often exists as /dev/kvm and still fails: qemu aborts setting an
# MSR, or the guest never prints. Boot the kernel for real (it panics at once
# without a root file system) and look for its banner.
kvm_works() {
	[ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
	timeout -k 5 30 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults \
		-display none -no-reboot -serial stdio -kernel "$kernel" \
		-append "console=ttyS0 panic=-1" 2>&1 </dev/null | grep -q -m1 "Linux version"
}
accel=()
case ${VM_KVM:-auto} in
yes) mode=kvm ;;
no) mode=tcg ;;
*) if kvm_works; then mode=kvm; else mode=tcg; fi ;;
esac
if [ "$mode" = tcg ]; then
	accel=(--disable-kvm) # virtme-ng then runs qemu with -cpu max
	echo "vm-test: KVM is missing or unusable here: software emulation (TCG), which is slow"
fi

echo "vm-test: booting $kernel (host runs $(uname -r)), ${VM_CPUS:-2} vCPUs, ${VM_MEMORY:-4G}, $mode"
guest_command="tests/vm/guest.sh ${binaries[*]}"
set +e
PATH="$(dirname "$VNG"):$PATH" timeout -k 30 "${VM_TIMEOUT:-2100}" \
	"$VNG" --run "$kernel" "${accel[@]}" --cpus "${VM_CPUS:-2}" --memory "${VM_MEMORY:-4G}" \
	--exec "$guest_command" </dev/null 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e

elapsed=$((SECONDS - start))
echo
echo "=== vm-test ==="
echo "host kernel:  $(uname -r)"
guest_kernel=$(sed -n 's/^vm-test guest kernel: //p' "$LOG" | tail -1)
echo "guest kernel: ${guest_kernel:-unknown (the guest never started the tests)}"
echo "accelerator:  $mode"
echo "took:         ${elapsed} s (log: $LOG)"
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$LOG" | tail -1 || true)
if [ -z "$summary" ]; then
	echo "vm-test: no test summary from the guest (timed out after ${VM_TIMEOUT:-2100} s or crashed; exit $status)" >&2
	[ "$status" -ne 0 ] || status=1
elif [ "$guest_kernel" = "$(uname -r)" ]; then
	echo "vm-test: the guest ran the host's own kernel; pick another with VM_KERNEL" >&2
	status=1
fi
echo "vm-test: ${summary:-no summary}"
exit "$status"
