-- Rendered by edgefit: Dify's and the plugin daemon's own Postgres roles, run as the superuser
-- by the deploy (after the cluster is up) and by a restore (before its dumps go in). Idempotent.
-- The passwords come from the environment psql runs in (the deploy passes the host's secrets by
-- name, never on a command line); a restore runs it without them, only to make the roles.
-- The app owns the database dify (its migrations create and alter tables there) and nothing
-- else; the plugin daemon owns dify_plugin; neither is a superuser nor may create roles or
-- databases. Tables made before the roles existed (by the superuser) are handed over.
\set ON_ERROR_STOP on
\getenv app_password DB_APP_PASSWORD
\getenv plugin_password DB_PLUGIN_PASSWORD
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', name)
  FROM unnest(ARRAY['dify_app', 'dify_plugin']) AS name
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) \gexec
\if :{?app_password}
ALTER ROLE dify_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
ALTER ROLE dify_plugin WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'plugin_password';
\endif
SELECT format('CREATE DATABASE %I', name)
  FROM unnest(ARRAY['dify', 'dify_plugin']) AS name
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = name) \gexec
ALTER DATABASE dify OWNER TO dify_app;
ALTER DATABASE dify_plugin OWNER TO dify_plugin;

\connect dify
-- everything in the schema public not made by an extension: the role's own from now on
ALTER SCHEMA public OWNER TO dify_app;
SELECT format('ALTER %s %s OWNER TO %I',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, c.oid::regclass, 'dify_app')
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
   AND c.relowner <> 'dify_app'::regrole
   -- a serial's or identity's sequence goes with its table
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                          AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                     AND d.deptype = 'e') \gexec
SELECT format('ALTER TYPE %s OWNER TO %I', t.oid::regtype, 'dify_app')
  FROM pg_type t
 WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd', 'r')
   AND t.typowner <> 'dify_app'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
                     AND d.deptype = 'e') \gexec
SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, 'dify_app')
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace AND p.proowner <> 'dify_app'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                     AND d.deptype = 'e') \gexec

\connect dify_plugin
-- everything in the schema public not made by an extension: the role's own from now on
ALTER SCHEMA public OWNER TO dify_plugin;
SELECT format('ALTER %s %s OWNER TO %I',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, c.oid::regclass, 'dify_plugin')
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
   AND c.relowner <> 'dify_plugin'::regrole
   -- a serial's or identity's sequence goes with its table
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                          AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                     AND d.deptype = 'e') \gexec
SELECT format('ALTER TYPE %s OWNER TO %I', t.oid::regtype, 'dify_plugin')
  FROM pg_type t
 WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd', 'r')
   AND t.typowner <> 'dify_plugin'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
                     AND d.deptype = 'e') \gexec
SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, 'dify_plugin')
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace AND p.proowner <> 'dify_plugin'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                     AND d.deptype = 'e') \gexec

