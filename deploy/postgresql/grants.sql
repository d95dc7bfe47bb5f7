-- Roles for the gateway's PostgreSQL ledger (docs/several-hosts.md, "Roles and grants").
--
-- Simplest: one role owns the database's tables and serves; it needs no grants here
-- (`mpesa-wsgi migrate` as that role creates everything).
--
-- Least privilege, as below: an owner role runs `migrate` and `migrate-ledger` (they
-- create and change tables), and the serving role `gateway` may only read and write rows.
-- Run this file as the owner role (or a superuser), in the ledger's database, after the
-- owner's first `migrate` or `migrate-ledger`:
--   psql "postgresql://gateway_owner@db.internal/mpesa" -v ON_ERROR_STOP=1 -f grants.sql
-- The gateway then starts as `gateway`; a schema upgrade in a later release is the
-- owner's `migrate`, run before the new gateway starts (the gateway only reads the
-- schema version when it is up to date).
--
-- Once, as a superuser (roles are per server, not per database):
--   CREATE ROLE gateway_owner LOGIN PASSWORD '…';
--   CREATE ROLE gateway LOGIN PASSWORD '…';
--   CREATE DATABASE mpesa OWNER gateway_owner;

GRANT CONNECT ON DATABASE mpesa TO gateway;
GRANT USAGE ON SCHEMA public TO gateway;
-- Rows only: no CREATE, ALTER, DROP or TRUNCATE.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO gateway;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO gateway;
-- Tables and sequences a later `migrate` adds get the same grants.
ALTER DEFAULT PRIVILEGES FOR ROLE gateway_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO gateway;
ALTER DEFAULT PRIVILEGES FOR ROLE gateway_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO gateway;
