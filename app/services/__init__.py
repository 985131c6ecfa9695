"""The service's logic: routes and workers call these; they call repositories, storage and merging."""
