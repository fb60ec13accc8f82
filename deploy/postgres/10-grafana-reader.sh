#!/bin/sh
# Run once by the postgres image when it initialises an empty data
# directory (/docker-entrypoint-initdb.d): a read-only login role for
# Grafana's dashboards. The tables and views are created later by the
# deadbolt services' migrations, as POSTGRES_USER; default privileges give
# the reader SELECT on each of them as it is created, and nothing else.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v reader_password="$DEADBOLT_GRAFANA_DB_PASSWORD" \
     -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE;
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
GRANT CONNECT ON DATABASE :"db" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT ON TABLES TO grafana_reader;
SQL
