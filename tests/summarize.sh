#!/usr/bin/env bash
# tests/summarize.sh LABEL LOG: summarise a `go test -v` log: every skipped test with its reason,
# every failed test, and a closing line "LABEL: N passed, N failed, N skipped". Exits non-zero
# when a test or package failed, or when no test passed (a run that tested nothing is a failure).
set -euo pipefail
label=$1 log=$2
pass=$(grep -cE '^\s*--- PASS' "$log" || true)
fail=$(grep -cE '^\s*--- FAIL' "$log" || true)
skip=$(grep -cE '^\s*--- SKIP' "$log" || true)
pkgfail=$(grep -cE '^(FAIL\s|panic:|# )' "$log" || true)
if [ "$skip" -gt 0 ]; then
	echo "== $label: skipped tests and why"
	# go test -v prints the reason on the line before "--- SKIP".
	grep -B1 -E '^\s*--- SKIP' "$log" | grep -vE '^--$' | paste - - | sed -E 's/^\s*(.*)\t\s*--- SKIP: ([^ ]+).*/  \2: \1/'
fi
if [ "$fail" -gt 0 ] || [ "$pkgfail" -gt 0 ]; then
	echo "== $label: failures"
	grep -E '^\s*--- FAIL|^FAIL\s|^panic:|^# ' "$log" | sed 's/^/  /'
fi
echo "$label: $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ] && [ "$pkgfail" -eq 0 ] && [ "$pass" -gt 0 ]
