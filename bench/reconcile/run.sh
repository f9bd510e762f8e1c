#!/bin/sh
# Reconciler figures for issue 3: commit-to-live over git daemon with a webhook, one pass of a
# 10,000-Mapping repository, and RSS across 1,000 applied revisions. The measurements live in
# tests/it/git_source.rs as ignored tests (they share its git/daemon helpers) and print lines
# starting with BENCH. Debug build unless PROFILE=--release is given.
set -eu
cd "$(dirname "$0")/../.."
cargo test ${PROFILE:-} --test it -- --ignored --nocapture --test-threads=1 git_source::bench_ 2>&1 \
    | grep -oE 'BENCH.*|test result.*|panicked.*'
