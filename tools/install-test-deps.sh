#!/usr/bin/env bash
# Installs what `cargo test --workspace` needs beyond Rust: PostgreSQL and the pgvector
# extension, for tests/pgvector.rs (Debian/Ubuntu, as root; does nothing when present).
# The README's test command and .ci/run both run it.
set -euo pipefail
# tests/pgvector.rs starts its own throwaway cluster (initdb in a temp dir, unix socket only;
# as root it runs it as the `postgres` user): it needs the server binaries and the pgvector
# extension, and fails without them. Debian bookworm has no pgvector package (trixie and the
# PGDG repository do): then build the pinned release from Debian's source tarball.
pg_bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
if [[ -z "$(pg_bin_dir)" ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
fi
PG_MAJOR=$(basename "$(dirname "$(pg_bin_dir)")")
if [[ ! -f /usr/share/postgresql/$PG_MAJOR/extension/vector.control ]]; then
    apt-get update -qq
    if apt-cache show "postgresql-$PG_MAJOR-pgvector" >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "postgresql-$PG_MAJOR-pgvector"
    else
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "postgresql-server-dev-$PG_MAJOR" build-essential curl ca-certificates
        PGV=0.8.0
        PGV_SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
        pgv_src=$(mktemp -d)
        curl -fsSL -o "$pgv_src/pgvector.tar.gz" "https://deb.debian.org/debian/pool/main/p/pgvector/pgvector_$PGV.orig.tar.gz"
        echo "$PGV_SHA256  $pgv_src/pgvector.tar.gz" | sha256sum -c --quiet
        tar -xzf "$pgv_src/pgvector.tar.gz" -C "$pgv_src"
        # OPTFLAGS="": no -march=native, so the build runs on any x86-64.
        make -s -C "$pgv_src/pgvector-$PGV" OPTFLAGS="" PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config"
        make -s -C "$pgv_src/pgvector-$PGV" OPTFLAGS="" PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" install
        rm -rf "$pgv_src"
    fi
fi
