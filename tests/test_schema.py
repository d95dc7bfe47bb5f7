"""Both engines end with the same schema: the DDL is written once per dialect (SQLite's
types, identity columns and index forms differ from PostgreSQL's), so this test holds the
two texts to one description: the same tables, columns and indexes, and nothing else but
the differences named below."""

import mpesa_ledger as store

# What only PostgreSQL keeps: the fleet's shared state and its migration log, and the
# outbox's written order as a column (SQLite's is the rowid).
POSTGRES_ONLY_TABLES = {"fleet_token", "rate_buckets", "schema_migrations"}
POSTGRES_ONLY_COLUMNS = {("events", "seq")}


def sqlite_schema(ledger):
    tables = {r["name"] for r in ledger._read(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    columns = {(t, r["name"]) for t in tables
               for r in ledger._read(f"SELECT name FROM pragma_table_info('{t}')")}
    indexes = {(r["tbl_name"], r["name"]) for r in ledger._read(
        "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index'"
        " AND name NOT LIKE 'sqlite_autoindex_%'")}
    return tables, columns, indexes


def postgres_schema(ledger):
    tables = {r["table_name"] for r in ledger._read(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    columns = {(r["table_name"], r["column_name"]) for r in ledger._read(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public'")}
    # Constraint-backed indexes (primary keys, UNIQUE) are SQLite's autoindexes: left out.
    indexes = {(r["tablename"], r["indexname"]) for r in ledger._read(
        "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'"
        " AND indexname NOT IN (SELECT conname FROM pg_constraint)")}
    return tables, columns, indexes


def test_both_engines_make_the_same_tables_columns_and_indexes(tmp_path, pg_url):
    lite = store.open_ledger(str(tmp_path / "schema.db"))
    pg = store.open_ledger(pg_url)
    try:
        lite_tables, lite_columns, lite_indexes = sqlite_schema(lite)
        pg_tables, pg_columns, pg_indexes = postgres_schema(pg)
    finally:
        lite.close()
        pg.close()
    assert "transactions" in lite_tables and ("transactions", "owner") in lite_columns
    assert ("events", "events_pending_tx") in lite_indexes  # the catalogs were read
    assert pg_tables - POSTGRES_ONLY_TABLES == lite_tables
    assert {c for c in pg_columns if c[0] not in POSTGRES_ONLY_TABLES} \
        - POSTGRES_ONLY_COLUMNS == lite_columns
    assert {i for i in pg_indexes if i[0] not in POSTGRES_ONLY_TABLES} == lite_indexes
