"""PostgreSQL access through asyncpg: the schema, its migrations and every query. Nothing else."""
