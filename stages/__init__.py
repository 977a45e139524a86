"""spine-ssl: one module per workflow stage, each a ``python -m stages.<name>`` CLI over pure, typed functions."""
