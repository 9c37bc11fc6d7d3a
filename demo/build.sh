#!/bin/sh
# Builds the demo program into target/demo/hotloop (or $CARGO_TARGET_DIR/demo/hotloop)
# and prints its path. Needs only gcc.
#
# Compiled with -pg -mfentry -mrecord-mcount (every function starts with a call to
# __fentry__, listed in __mcount_loc); linked WITHOUT -pg (gcrt1 would start gprof), as a
# PIE whose __mcount_loc table needs text relocations (-z notext). gcc 12 emits the 6-byte
# `call *__fentry__@GOTPCREL(%rip)` there; glibc's __fentry__ does nothing unless gprof
# runs, so the program also runs untraced.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../target}
out=$target/demo
mkdir -p "$out"
gcc -O2 -g -pthread -pg -mfentry -mrecord-mcount -c "$here/hotloop.c" -o "$out/hotloop.o"
gcc -pthread -o "$out/hotloop" "$out/hotloop.o" -Wl,-z,notext
cd "$out" && echo "$(pwd)/hotloop"
