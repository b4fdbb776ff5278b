"""The SQL surface: the only room that speaks DuckDB's Python UDF API."""
