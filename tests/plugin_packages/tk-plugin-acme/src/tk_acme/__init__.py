"""tk-plugin-acme: what the issue's plugin author built, trimmed to what tk's tests need."""
