"""The web view at /ui: the tenant's streams, and per stream its versions, lineage and fold plots."""
