"""Config sources of the controller: where objects come from (YAML directory, later the API)."""
