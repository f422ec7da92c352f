"""The compact preprocessing cache that tiles are read from (store) and its builder (build)."""
