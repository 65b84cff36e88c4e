//! The stead binary: server, agent, router, dev, and the CLI.
