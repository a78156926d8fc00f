#!/usr/bin/env bash
# Checks that building a subset of the workspace (`cargo test -p kms-storage`,
# `cargo nextest run -p kms`, ...) would reuse the RocksDB build of the whole
# workspace instead of compiling its C++ again (10-15 minutes on 2 cores).
#
# Cargo unifies features per selection of packages: a subset that enables fewer
# features of syn, regex, memchr, ... compiles a different bindgen, hence a
# different librocksdb-sys. storage/Cargo.toml pins those features in its
# [build-dependencies]; this script compares, for several selections, every unit
# that RocksDB's build depends on (package, mode, features, profile) with the
# whole workspace's. Needs a nightly toolchain for `--unit-graph` (read-only:
# nothing is built). Run it after changing dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
units() {
  cargo +nightly "$@" --offline --unit-graph -Z unstable-options --all-features 2>/dev/null | python3 -c '
import json, sys
units = json.load(sys.stdin)["units"]
todo = [i for i, u in enumerate(units) if "rocksdb" in u["pkg_id"]]
seen, out = set(), set()
while todo:
    i = todo.pop()
    if i in seen:
        continue
    seen.add(i)
    u = units[i]
    out.add((u["pkg_id"].split("#")[-1], u["target"]["name"], u["mode"],
             ",".join(sorted(u["features"])), str(u["profile"].get("opt_level"))))
    todo.extend(d["index"] for d in u["dependencies"])
for line in sorted(out):
    print(" ".join(line))
'
}
whole=$(units build --workspace --all-targets)
status=0
for selection in "-p kms-storage" "-p kms" "-p kms -p kms-client" "-p kms-tests" "-p kms-bench"; do
  # shellcheck disable=SC2086
  if ! diff <(echo "$whole") <(units test --no-run $selection) >/tmp/kms-build-features.diff; then
    echo "cargo test $selection would build RocksDB differently from the workspace:" >&2
    cat /tmp/kms-build-features.diff >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "every selection reuses the workspace's RocksDB build"
exit "$status"
