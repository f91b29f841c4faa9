"""The controller's gRPC server: Certificates, Config (delta stream per node) and Admin services."""
