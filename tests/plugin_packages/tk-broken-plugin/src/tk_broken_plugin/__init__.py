"""A plugin whose module raises on import: tk must report it and keep working."""

raise RuntimeError("tk-broken-plugin always fails on import")
