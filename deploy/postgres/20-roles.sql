-- deadbolt's database roles: who may run DDL, who may read the API keys.
--
--   deadbolt_migrate  owns the schema: runs the migrations (the
--                     deadbolt-migrate Job, DEADBOLT_MIGRATE=true), nothing else.
--   deadbolt_gateway  the gateway pods: reads and writes every deadbolt table,
--                     api_keys and teams included (it authenticates callers and
--                     manages keys); no DDL, and migrations' bookkeeping
--                     (_sqlx_migrations) read-only.
--   deadbolt_stage    the stage pods (poisoner, trainer, analyzer, pruner):
--                     only the job queue and the result tables (the list
--                     below); NO privilege on api_keys or teams, no DDL.
--
-- The gateway and stage pods connect with DEADBOLT_MIGRATE=false: they run
-- no DDL and refuse to start until the schema is migrated (the
-- _sqlx_migrations table they read for that check).
--
-- Run it as a superuser (or as a role with CREATEROLE that is a member of
-- deadbolt_migrate, for ALTER DEFAULT PRIVILEGES), connected to the deadbolt
-- database:
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/20-roles.sql
-- once before the first migration (it creates the roles and the schema
-- rights deadbolt_migrate needs to migrate) and again after every migration
-- (it grants on the tables that exist; a table it lists that does not exist
-- yet is skipped with a NOTICE). It is idempotent and plain SQL (no psql
-- variables), so crates/deadbolt-store/tests/roles.rs applies it as is.
-- Passwords are not set here: ALTER ROLE deadbolt_stage PASSWORD '...' (or
-- \password deadbolt_stage) once, from your secret manager.
--
-- Why the stage grants are a list and not default privileges: a table a
-- future migration adds is NOT readable by stage pods until it is listed
-- here (fail closed: a new table that holds credentials never reaches them
-- by default). The gateway's grants, in contrast, follow new tables through
-- default privileges (it needs every table). The test roles.rs fails while
-- a table of the migrated schema is neither granted to deadbolt_stage here
-- nor on its deny list (api_keys, teams), so a new table gets a decision.
-- See docs/deploy-roles.md.

-- 1. The roles (cluster-wide, so created only when missing; concurrent runs
-- in other databases of the same server may race on the creation).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['deadbolt_migrate', 'deadbolt_gateway', 'deadbolt_stage'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- exists already
        END;
    END LOOP;
END
$$;

-- 2. The database and the schema: only deadbolt_migrate creates objects.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO deadbolt_migrate, deadbolt_gateway, deadbolt_stage',
                   current_database());
END
$$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO deadbolt_migrate;
GRANT USAGE ON SCHEMA public TO deadbolt_gateway, deadbolt_stage;

-- 3. Objects deadbolt_migrate creates from now on: the gateway may read and
-- write every table and view; both use the sequences (run_events.seq).
-- Nothing by default for deadbolt_stage's tables (see above).
ALTER DEFAULT PRIVILEGES FOR ROLE deadbolt_migrate IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO deadbolt_gateway;
ALTER DEFAULT PRIVILEGES FOR ROLE deadbolt_migrate IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO deadbolt_gateway, deadbolt_stage;

-- 4. The tables that exist now (re-run after each migration).
DO $$
DECLARE
    g record;
BEGIN
    -- the gateway: everything (tables and views; TRUNCATE, REFERENCES and
    -- TRIGGER are not granted), the migrations' record read-only
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO deadbolt_gateway;
    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO deadbolt_gateway, deadbolt_stage;
    IF to_regclass('public._sqlx_migrations') IS NOT NULL THEN
        REVOKE INSERT, UPDATE, DELETE ON public._sqlx_migrations FROM deadbolt_gateway;
    END IF;

    -- the stage pods: exactly this list (whatever else was granted to the
    -- role before is revoked first, in the same transaction)
    REVOKE ALL ON ALL TABLES IN SCHEMA public FROM deadbolt_stage;
    FOR g IN
        SELECT * FROM (VALUES
            -- sqlx's record: checked at start-up (DEADBOLT_MIGRATE=false)
            ('_sqlx_migrations', 'SELECT'),
            -- the run a job belongs to (its spec and team); runs are
            -- created, driven and cancelled by the gateway
            ('runs',             'SELECT'),
            -- the job queue: a stage RPC enqueues its run's job, workers
            -- lease, heartbeat, complete, fail and release jobs
            ('stage_jobs',       'SELECT, INSERT, UPDATE'),
            -- progress events (appends only; seq from run_events_seq_seq)
            ('run_events',       'SELECT, INSERT'),
            -- the results the stages write (upserts)
            ('metrics',          'SELECT, INSERT, UPDATE'),
            ('neuron_stats',     'SELECT, INSERT, UPDATE'),
            ('pruning_curves',   'SELECT, INSERT, UPDATE'),
            ('pruning_choices',  'SELECT, INSERT, UPDATE'),
            ('scan_results',     'SELECT, INSERT, UPDATE'),
            -- artifact records; the trainer deletes superseded checkpoints
            ('artifacts',        'SELECT, INSERT, UPDATE, DELETE')
            -- deny list, never granted to deadbolt_stage: api_keys (key
            -- hashes, scopes), teams; the dashboard views
        ) AS t (tbl, privs)
    LOOP
        IF to_regclass(format('public.%I', g.tbl)) IS NULL THEN
            RAISE NOTICE 'deadbolt roles: table % does not exist yet (run this again after the migrations)', g.tbl;
        ELSE
            EXECUTE format('GRANT %s ON public.%I TO deadbolt_stage', g.privs, g.tbl);
        END IF;
    END LOOP;
END
$$;
