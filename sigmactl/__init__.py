"""sigmactl: the command line client of the Sigma HTTP API."""
