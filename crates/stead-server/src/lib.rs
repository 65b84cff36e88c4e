//! The control plane: the /v1 HTTP API over the store.
