"""The provisioning HTTP API (`callctl serve api`)."""
