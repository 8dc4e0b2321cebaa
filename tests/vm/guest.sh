#!/usr/bin/env bash
# Runs inside the virtme-ng guest (started by tests/vm/run.sh): the test
# binaries named as arguments, as `cargo test --release -- --test-threads=2`
# would, then one summary line. Exits non-zero when any test failed.
set -u

echo "vm-test guest kernel: $(uname -r)"
echo "vm-test guest cgroup2: $(findmnt -n -t cgroup2 -o TARGET)"
# virtme-ng mounts cgroup2 at /sys/fs/cgroup and a tmpfs on /run (so
# `ip netns add` can create /run/netns), but not the BPF file system.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# Under CI=true a test that lacks root or a kernel feature fails instead of
# skipping.
export CI=true RUST_BACKTRACE=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

passed=0
failed=0
status=0
log=$(mktemp)
for binary in "$@"; do
	echo "     Running $binary"
	"$binary" --test-threads=2 2>&1 | tee "$log"
	[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
	# "test result: ok. 9 passed; 0 failed; 0 ignored; ..."
	result=$(grep '^test result:' "$log" | tail -1)
	if [ -z "$result" ]; then
		echo "vm-test: $binary printed no test result"
		status=1
		continue
	fi
	passed=$((passed + $(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$result")))
	failed=$((failed + $(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$result")))
done
rm -f "$log"
echo "$passed passed, $failed failed"
exit "$status"
