//! Sandboxes instances run in: the process backend (Linux namespaces, cgroups).
