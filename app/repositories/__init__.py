"""Every SQL query of the service lives in these modules."""
