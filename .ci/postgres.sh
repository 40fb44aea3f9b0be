#!/usr/bin/env bash
# Make a PostgreSQL server available on localhost for the multi-worker study test:
# install Debian's package when missing, start its cluster (listening on localhost only),
# create the test role and database. Prints the SQLAlchemy URL.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
  pg_createcluster "$version" main >&2
fi
conf=/etc/postgresql/$version/main/postgresql.conf
grep -q "^listen_addresses = 'localhost'" "$conf" || echo "listen_addresses = 'localhost'" >> "$conf"
pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online \
  || pg_ctlcluster "$version" main start >&2
for _ in $(seq 1 30); do
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='polca'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"create role polca login password 'polca'\"" >&2
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='polca_test'\"" | grep -q 1 \
  || su postgres -c "createdb -O polca polca_test" >&2
echo "postgresql+psycopg2://polca:polca@localhost:5432/polca_test"
