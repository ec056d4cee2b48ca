"""Sessions spread over a Ray cluster: avatar hosts (Ray actors), a registry actor, and HTTP front doors."""
